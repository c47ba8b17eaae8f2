"""ServedPRM on real vLLM servers (run in .venv-vllm; skipped without vLLM): a tiny random Qwen2ForProcessRewardModel
scored by a launched vLLM pooling server equals QwenMathPRM in process; the demo config trains through prpo-fit with a
ServedPRM that launches its own server; a server killed mid-run gives a named error or a skipped batch; no server
outlives a test.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=$PWD .venv-vllm/bin/python -m pytest -q tests/test_prm_served.py

Two vLLM servers start in this file (about 40-60 s each on a loaded 2-core CPU): the module's (equality, the kill),
and the one prpo-fit launches.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import lightning as L  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from components.prms import QwenMathPRM, ServedPRM  # noqa: E402
from components.segmenters import DelimiterSegmenter  # noqa: E402
from components.vllm_server import free_port  # noqa: E402
from helpers import build_char_tokenizer  # noqa: E402
from prpo_lightning.scoring.faults import PRMError  # noqa: E402
from test_prms import batch_from_ids  # noqa: E402
from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 160  # the longest row below is truncated (carry-forward rule), the others fit
SERVER = {"dtype": "float32", "max_length": MAX_LENGTH, "kv_cache_memory_gib": 0.1, "gpu_memory_utilization": 0.05,
          "enforce_eager": True, "startup_timeout_s": 400.0, "request_timeout_s": 300.0, "retries": 1,
          "retry_wait_s": 0.5}
TEXTS = ["1+2=3;3*4=12;so the answer is 12", "7-2=5;", "", "x<extra_0>y;z;w", "a long line of work " * 8 + ";end"]
PROBLEMS = ["What is (1+2)*4?", "What is 7-2?", "Nothing?", "Tags?", "Long?"]


def build_tiny_prm(path: Path) -> Path:
    """A random Qwen2ForProcessRewardModel (head size 64, as vLLM's CPU attention needs) with a character tokenizer
    that has ``<extra_0>`` as one special token; the head is scaled so that step probabilities spread over (0, 1)."""
    from transformers import AutoTokenizer, Qwen2Config

    from components.prms import Qwen2ForProcessRewardModel

    build_char_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>", "<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(path)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      architectures=["Qwen2ForProcessRewardModel"], pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForProcessRewardModel(cfg)
    with torch.no_grad():
        for p in model.score.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


def alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def server_processes(pgid: int, log: Path) -> set[int]:
    """A launched server's processes: its process group, and every ``pid=`` its log names (API server, engine)."""
    pids = {p.pid for p in psutil.process_iter() if _pgid(p.pid) == pgid}
    if log.exists():
        pids |= {int(m) for m in re.findall(r"pid=(\d+)", log.read_text(errors="replace"))}
    return pids


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def wait_gone(pids: set[int], limit_s: float = 30.0) -> set[int]:
    deadline = time.monotonic() + limit_s
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory) -> Path:
    return build_tiny_prm(tmp_path_factory.mktemp("tiny_served_prm"))


@pytest.fixture(scope="module")
def served(prm_dir):
    """One ServedPRM that launches its vLLM server (the module's only one); stopped, and checked gone, at the end."""
    prm = ServedPRM(str(prm_dir), **SERVER)
    prm.setup("cpu")
    pids = server_processes(prm.server.process.pid, Path(prm.server.log_path))
    assert len(alive(pids)) >= 2  # the API server and its engine process
    yield prm
    prm.teardown()
    assert not wait_gone(pids), "the PRM server outlived teardown"


def policy_batch(prm_dir: Path):
    """The texts as a rollout batch of the (character) policy tokenizer, a step ending at every ";"."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prm_dir)
    rows = [tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if t else []) for t in TEXTS]
    batch = batch_from_ids(rows, PROBLEMS, tok.pad_token_id)
    batch.segment_spans = DelimiterSegmenter(delimiters=[";"]).segment(batch, tok)
    return batch, tok


def test_served_scores_equal_qwen_math_prm(served, prm_dir):
    batch, tok = policy_batch(prm_dir)
    reference = QwenMathPRM(str(prm_dir), dtype="float32", max_length=MAX_LENGTH, micro_batch_size=2)
    reference.setup("cpu")
    want = reference.score(batch, tok)
    got = served.score(batch, tok)
    assert torch.equal(got.step_mask, want.step_mask) and int(want.step_mask.sum()) >= 8
    diff = float((got.step_scores - want.step_scores).abs().max())
    print(f"max |ServedPRM - QwenMathPRM| = {diff:.3g}")
    assert diff < 1e-4
    valid = want.step_scores[want.step_mask]
    assert float(valid.max() - valid.min()) > 0.1  # the scores differ: the comparison can fail
    assert served.batch_metrics()["truncated_rows"] == reference.batch_metrics()["truncated_rows"] == 1.0


def test_cli_fit_demo_config_with_served_prm(prm_dir, tmp_path):
    """prpo-fit on the demo config, the PRM swapped for a ServedPRM that launches its own server (a fixed port, so
    that its process can be looked for after the run)."""
    port = free_port()
    prm = "--model.prm.init_args."
    args = [
        sys.executable, "-m", "prpo_lightning.cli", "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        "--model.prm=components.prms.ServedPRM", f"{prm}model_name_or_path={prm_dir}", f"{prm}port={port}",
        *(f"{prm}{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in SERVER.items()),
        "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks=[]",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--model.sampling.num_generations=4", "--model.sampling.max_new_tokens=24", "--data.init_args.batch_size=2",
    ]
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
    run = subprocess.run(args, capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    (log,) = temp.glob(f"prpo_vllm_server_*_{port}.log")  # the server's log, in the trainer's temp folder
    pids = server_processes(-1, log)
    assert len(pids) >= 2, f"no server pids in {log}"
    assert not wait_gone(pids), "prpo-fit left its PRM server running"
    (metrics,) = tmp_path.glob("**/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/prm/request_s")]
    assert len(rows) == 2 and all(float(r["train/prm/request_s"]) > 0 for r in rows)
    assert all(0.0 <= float(r["train/prm/score_mean"]) <= 1.0 for r in rows)


class KillServerAfterFirstStep(L.Callback):
    """SIGKILL the PRM's launched server (its whole process group) after the first training step."""

    def __init__(self, prm: ServedPRM) -> None:
        self.prm = prm
        self.first_step: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.first_step = self.prm.batch_metrics()  # set by a successful scoring call only
            os.killpg(self.prm.server.process.pid, signal.SIGKILL)
            self.prm.server.process.wait(30)


def test_server_killed_mid_run_gives_skip_or_named_error(served, prm_dir, tmp_path):
    """Last in this file: it kills the module's server during a run (on_prm_error: skip), then checks the errors."""
    from test_faults import _OneSegment, _ProcessAligner

    batch, tok = policy_batch(prm_dir)
    connect = {k: SERVER[k] for k in ("dtype", "max_length", "retries", "retry_wait_s", "request_timeout_s")}
    connected = ServedPRM(str(prm_dir), urls=[served.server.url], **connect)
    connected.setup("cpu")
    assert connected.score(batch, tok).step_mask.any()
    tok_dir = tokenizer_dir(tmp_path)
    module = make_module(tok_dir, segmenter=_OneSegment(), prm=served, aligner=_ProcessAligner(), on_prm_error="skip")
    kill = KillServerAfterFirstStep(served)
    trainer = make_trainer(tmp_path, 2, callbacks=[kill])
    trainer.fit(module, ToyPrompts())
    assert trainer.global_step == 2 and not served.server.alive
    assert kill.first_step["request_s"] > 0  # step 1 was scored on the server ...
    assert trainer.callback_metrics["train/faults/prm_errors"] == 1.0  # ... step 2's update was skipped
    start = time.monotonic()
    with pytest.raises(PRMError, match=r"launched at http://127\.0\.0\.1:\d+ has exited with code -9"):
        served.score(batch, tok)
    with pytest.raises(PRMError, match=r"POST http://127\.0\.0\.1:\d+/pooling failed 2 time\(s\)"):
        connected.score(batch, tok)
    assert time.monotonic() - start < 30.0
    module = make_module(tok_dir, segmenter=_OneSegment(), prm=served, aligner=_ProcessAligner(), on_prm_error="raise")
    with pytest.raises(PRMError, match=r"PRM ServedPRM failed .*has exited with code -9"):
        make_trainer(tmp_path, 1).fit(module, ToyPrompts())
