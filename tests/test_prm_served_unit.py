"""ServedPRM without vLLM: requests, response parsing, concurrency, time limits, retries, errors and the launched
server's lifecycle, against the fake pooling server of tests/fake_prm_server.py (a thread, or a launched process).

The real vLLM server is tested in tests/test_prm_served.py (vLLM environment).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from components.prms import QwenMathPRM, ServedPRM
from components.vllm_server import ServerError, free_port
from fake_prm_server import FakePRMServer, fake_logit, fake_python
from helpers import build_char_tokenizer
from prpo_lightning.scoring.faults import PRMError
from prpo_lightning.scoring.pipeline import guarded_call

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = ["What is 1+2?", "A long one", "Empty", "Tag inside", "Short"]
SYSTEM = "Be exact."
STEPS = [["1+2=3\n", "3*1=3\n", "so 3"], ["a long step " * 8, "b", "c"], [], ["x<extra_0>y"], ["ok"]]


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory) -> Path:
    """A character tokenizer with the PRM's special tokens (no weights: the fake server has none)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("served_prm")
    build_char_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>", "<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tag_id(prm_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prm_dir).convert_tokens_to_ids("<extra_0>")


@pytest.fixture
def server(tag_id):
    fake = FakePRMServer(tag_id).start()
    yield fake
    fake.stop()


class _LocalFakePRM(QwenMathPRM):
    """The in-process path (TaggedStepPRM.read_step_probs) with the fake server's logits as the model."""

    def positive_probs(self, model, input_ids, attention_mask):
        out = torch.zeros(input_ids.shape, dtype=torch.float32)  # (b, N)
        for r in range(input_ids.shape[0]):
            ids = input_ids[r, : int(attention_mask[r].sum())].tolist()
            for j in range(len(ids)):
                out[r, j] = torch.sigmoid(torch.tensor(fake_logit(ids, j)))
        return out


def served(prm_dir, urls, **kw) -> ServedPRM:
    kw = {"max_length": 80, "micro_batch_size": 2, "retry_wait_s": 0.05, "system_prompt": SYSTEM, **kw}
    return ServedPRM(str(prm_dir), dtype="float32", urls=urls, **kw)


# --------------------------------------------------------------------------- scores and requests
def test_scores_equal_the_in_process_path_on_the_same_inputs(prm_dir, server):
    prm = served(prm_dir, [server.url])
    local = _LocalFakePRM(str(prm_dir), dtype="float32", max_length=80, micro_batch_size=2, system_prompt=SYSTEM)
    local.model = torch.nn.Identity()  # positive_probs above is the model
    local.setup("cpu")
    got, want = prm.score_texts(PROBLEMS, STEPS), local.score_texts(PROBLEMS, STEPS)
    assert [len(r) for r in got] == [3, 3, 0, 1, 1]
    assert max(abs(a - b) for r, s in zip(got, want) for a, b in zip(r, s)) < 1e-6
    assert len({round(v, 4) for r in got for v in r}) > 3  # the scores differ between steps
    metrics = prm.batch_metrics()
    assert metrics["truncated_rows"] == 1.0 and metrics["carried_steps"] == 2.0 and metrics["request_s"] > 0
    scoring = server.requests[1:]  # the first one is setup's probe
    inputs, _, _ = local.encode_inputs(PROBLEMS, STEPS)
    assert len(scoring) == math.ceil(len(inputs) / 2)
    assert sorted(ids for body in scoring for ids in body["input"]) == sorted(ids for _, ids, _ in inputs)
    for body in scoring:
        assert (body["task"], body["use_activation"], body["add_special_tokens"]) == ("token_classify", False, False)
        assert all(len(ids) <= 80 for ids in body["input"])


def test_requests_run_concurrently_round_robin_over_urls(prm_dir, tag_id):
    servers = [FakePRMServer(tag_id, delay_s=0.3).start() for _ in range(2)]
    try:
        prm = served(prm_dir, [s.url for s in servers], micro_batch_size=1, max_concurrency=2)
        prm.setup("cpu")
        problems, steps = ["q"] * 8, [[f"step {i}"] for i in range(8)]
        assert len(prm.score_texts(problems, steps)) == 8
        assert [len(s.requests) - 1 for s in servers] == [4, 4]  # minus setup's probe
        assert sum(s.max_in_flight for s in servers) >= 2  # requests overlapped (on the two servers)
        assert max(s.max_in_flight for s in servers) <= 2  # never more than max_concurrency (unbounded: 4 each)
    finally:
        for s in servers:
            s.stop()


# --------------------------------------------------------------------------- settings and setup errors
@pytest.mark.parametrize("kw, match", [
    ({"launch": True, "urls": ["http://127.0.0.1:8000"]}, r"launch is true and model\.prm\.init_args\.urls is set"),
    ({"launch": False}, r"launch is false and no model\.prm\.init_args\.urls"),
    ({"urls": ["127.0.0.1:8000"]}, r"urls\[0\] '127\.0\.0\.1:8000' is not an http"),
    ({"urls": ["http://h:1"], "request_timeout_s": 0}, r"request_timeout_s must be > 0"),
])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ServedPRM("m", **kw)


def test_unreachable_url_names_url_and_launch_command_before_model_work(prm_dir):
    url = f"http://127.0.0.1:{free_port()}"
    prm = served(prm_dir, [url], retries=0)
    with pytest.raises(ServerError, match=r"urls\[0\]\): no vLLM server answers at " + url) as err:
        prm.setup("cpu")
    assert "vllm.entrypoints.openai.api_server" in str(err.value) and "--runner pooling" in str(err.value)
    assert prm.tokenizer is None  # nothing was loaded


def test_server_reading_another_step_tag_is_refused(prm_dir, tag_id):
    fake = FakePRMServer(tag_id + 1).start()
    try:
        with pytest.raises(ServerError, match=r"not a PRM pooling server.*--pooler-config '\{\"step_tag_id\": "
                                              + str(tag_id)):
            served(prm_dir, [fake.url]).setup("cpu")
    finally:
        fake.stop()


def test_server_shorter_than_max_length_is_refused(prm_dir, tag_id):
    fake = FakePRMServer(tag_id, max_model_len=32).start()
    try:
        with pytest.raises(ServerError, match=r"at most 32 tokens, but model\.prm\.init_args\.max_length is 80"):
            served(prm_dir, [fake.url]).setup("cpu")
    finally:
        fake.stop()


# --------------------------------------------------------------------------- failures while scoring
def test_error_answer_is_a_prm_error_and_not_retried(prm_dir, server):
    prm = served(prm_dir, [server.url], retries=3)
    prm.setup("cpu")
    server.mode = "error"
    with pytest.raises(PRMError, match=r"answered HTTP 500.*engine dead"):
        prm.score_texts(["q"], [["a"]])
    assert len(server.requests) == 2  # the probe and one scoring request


@pytest.mark.parametrize("mode, match", [
    ("wrong_rows", r"answered 2 score rows for an input with 1 step separators"),
    ("nan", r"not pairs of finite numbers"),
    ("garbage", r"expected a pooling response"),
])
def test_malformed_answers_are_prm_errors(prm_dir, server, mode, match):
    prm = served(prm_dir, [server.url])
    prm.setup("cpu")
    server.mode = mode
    with pytest.raises(PRMError, match=match):
        prm.score_texts(["q"], [["a"]])


def test_slow_server_hits_the_time_limit(prm_dir, server):
    prm = served(prm_dir, [server.url], request_timeout_s=0.5, retries=1)
    prm.setup("cpu")
    server.mode, server.delay_s = "slow", 5.0
    start = time.monotonic()
    with pytest.raises(PRMError, match=r"failed after it was sent \(time limit 0\.5 s; not retried\)"):
        prm.score_texts(["q"], [["a"]])  # a request the server may still be working on is never sent twice
    assert time.monotonic() - start < 3.0


def test_server_gone_mid_run_is_a_prm_error_after_bounded_retries(prm_dir, tag_id):
    fake = FakePRMServer(tag_id).start()
    prm = served(prm_dir, [fake.url], retries=2, request_timeout_s=2.0)
    assert prm.score_texts(["q"], [["a"]])[0]
    fake.stop()
    start = time.monotonic()
    with pytest.raises(PRMError, match=r"failed 3 time\(s\)"):
        guarded_call("PRM", prm, "score", lambda: prm.score_texts(["q"], [["a"]]), 1)
    assert time.monotonic() - start < 10.0


# --------------------------------------------------------------------------- a launched server (fake process)
def _group_alive(pgid: int) -> list[int]:
    return [p.pid for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid and p.status() != "zombie"]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _wait_gone(pgid: int, limit_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + limit_s
    while (alive := _group_alive(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def test_launch_arguments_scoring_death_and_teardown(prm_dir, tag_id, tmp_path):
    prm = served(prm_dir, None, python=fake_python(tmp_path), kv_cache_memory_gib=0.25, enforce_eager=True,
                 server_args=["--seed", "0"], startup_timeout_s=60)
    prm.setup("cpu")
    server = prm.server
    assert server is not None and server.alive
    prm.setup("cpu")  # a later stage (validate after fit) reuses the running server
    assert prm.server is server
    args = server.command()
    assert args[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and args[args.index("--model") + 1] == str(prm_dir)
    joined = " ".join(args)
    for part in ("--runner pooling", "--dtype float32", "--max-model-len 80", f'{{"step_tag_id": {tag_id}}}',
                 f"--kv-cache-memory-bytes {1 << 28}", "--enforce-eager", "--seed 0"):
        assert part in joined, part
    assert prm.score_texts(["q"], [["a", "b"]])[0]
    pgid = server.process.pid
    os.killpg(pgid, signal.SIGKILL)  # the server dies mid-run
    server.process.wait(10)
    with pytest.raises(PRMError, match=r"has exited with code -9(.|\n)*fake PRM server argv"):
        prm.score_texts(["q"], [["a"]])
    prm.teardown()
    assert prm.server is None and not _wait_gone(pgid)


def test_launched_server_dies_with_a_killed_trainer(prm_dir, tmp_path):
    """kill -9 of the process that launched the server: no orphan (PR_SET_PDEATHSIG)."""
    code = (
        "import os, signal, sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "from components.prms import ServedPRM\n"
        f"prm = ServedPRM({str(prm_dir)!r}, dtype='float32', max_length=80, python={fake_python(tmp_path)!r}, "
        "startup_timeout_s=60)\n"
        "prm.setup('cpu')\n"
        "print(prm.server.process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    pid = int(run.stdout.split()[0])
    assert not _wait_gone(pid), f"server group {pid} outlived its trainer"


SHARE_WORKER = """
import json, sys
import torch.distributed as dist
from components.prms import ServedPRM
rank, init, prm_dir, fake, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
result = {}
try:
    ServedPRM(prm_dir, dtype="float32", max_length=80, python="/bin/false", startup_timeout_s=30).setup("cpu")
except Exception as err:
    result["failed_launch"] = type(err).__name__ + ": " + str(err)[:300]
prm = ServedPRM(prm_dir, dtype="float32", max_length=80, python=fake, startup_timeout_s=60)
prm.setup("cpu")
result.update(url=prm.clients[0].url, launched=prm.server is not None, scores=prm.score_texts(["q"], [["a", "b"]]),
              pid=prm.server.process.pid if prm.server else None)
dist.barrier()
prm.teardown()
open(out + "/" + str(rank) + ".json", "w").write(json.dumps(result))
dist.destroy_process_group()
"""


def test_ddp_ranks_share_rank_zeros_server_and_its_launch_errors(prm_dir, tmp_path):
    """Two gloo ranks: rank 0 launches, both score on its server; a failed launch is raised on both ranks."""
    fake = fake_python(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", SHARE_WORKER, str(r), str(tmp_path / "init"), str(prm_dir), fake,
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    import json

    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert r0["launched"] and not r1["launched"] and r0["url"] == r1["url"]
    assert r0["scores"] == r1["scores"] and len(r0["scores"][0]) == 2
    assert "exited with code 1" in r0["failed_launch"]
    assert "rank 0 could not launch the shared PRM server" in r1["failed_launch"]
    assert not _wait_gone(r0["pid"])
