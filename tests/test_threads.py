"""components.threads: the demo's thread count (free cores at the start, OMP_NUM_THREADS wins)."""

from __future__ import annotations

import pytest
import torch

from components import threads
from components.threads import TorchThreads, free_cores


def test_busy_cores_now_reads_the_cpu_time_of_a_window(tmp_path, monkeypatch):
    from components import threads

    stat = tmp_path / "stat"
    readings = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  150 0 150 900 0 0 0 0 0 0\n"])  # 100 of 200 busy

    def sleep(_: float) -> None:
        stat.write_text(next(readings))

    stat.write_text(next(readings))
    monkeypatch.setattr(threads.time, "sleep", sleep)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert threads.busy_cores_now(stat=str(stat)) == pytest.approx(1.0)  # half of 2 cores busy
    monkeypatch.setattr(threads.time, "sleep", lambda _: None)
    assert threads.busy_cores_now(stat=str(tmp_path / "missing")) is None


def test_free_cores_hand_values():
    assert free_cores(2, 0.0) == 2  # idle 2-core machine: both
    assert free_cores(2, 0.4) == 2
    assert free_cores(2, 0.6) == 1  # one core busy
    assert free_cores(2, 3.5) == 1  # load 3-4 on 2 cores: at least one thread
    assert free_cores(16, 5.2) == 11
    assert free_cores(4, -1.0) == 4  # never more than the cores


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_callback_sets_threads_unless_omp_num_threads(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cb = TorchThreads(1)
    cb.setup(None, None, "fit")
    assert cb.applied == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(threads, "free_cores", lambda: 2)
    auto = TorchThreads("auto")
    auto.setup(None, None, "fit")
    assert auto.applied == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    user = TorchThreads("auto")
    user.setup(None, None, "fit")
    assert user.applied is None and torch.get_num_threads() == 1  # the environment wins


def test_bad_thread_count_is_refused():
    with pytest.raises(ValueError, match="at least 1 thread"):
        TorchThreads(0)
