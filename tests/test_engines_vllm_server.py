"""VLLMServerEngine with real vLLM server processes (run in .venv-vllm; skipped where vLLM is not installed).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=$PWD .venv-vllm/bin/python -m pytest -q tests/test_engines_vllm_server.py

One module-wide engine launches two servers (~1 min on 2 loaded cores); the module-level tests connect to them by
URL, so that only the CLI run and the kill -9 test launch servers of their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402

import components.engine_vllm_server as server_module  # noqa: E402
import components.vllm_ranks as ranks_module  # noqa: E402
from components.engines import HFGenerateEngine, VLLMServerEngine  # noqa: E402
from components.vllm_server import ServerClient, ServerError  # noqa: E402
from components.vllm_support import IncompleteWeightsError  # noqa: E402
from helpers import build_char_tokenizer  # noqa: E402
from prpo_lightning import SampleRequest  # noqa: E402
from prpo_lightning.config import MismatchCheck, SamplerMismatchError  # noqa: E402
from prpo_lightning.rollout.engine import EngineRecoveryNeeded, StaleWeightsError  # noqa: E402
from prpo_lightning.rollout.offpolicy import mismatch_metrics  # noqa: E402
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer  # noqa: E402
from test_engines_vllm import SAMPLING, qwen2_config, trainer_logprobs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SERVER_KW = dict(max_model_len=256, kv_cache_memory_gib=0.1, request_timeout_s=120, startup_timeout_s=400)
DEFAULT_CHECK = MismatchCheck()  # logp_diff_max, float32 threshold 1e-3, raise


def group_alive(pid: int) -> bool:
    """A process of the group led by ``pid`` still exists."""
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(build_char_tokenizer(tmp_path_factory.mktemp("tok")))
    model = load_causal_lm(config=qwen2_config(128), seed=0).eval()  # the architecture of the modules trained below
    with torch.no_grad():  # a larger EOS embedding (tied with lm_head) makes EOS common: rows of varied length
        model.model.embed_tokens.weight[tok.eos_token_id] *= 8.0
    engine = VLLMServerEngine(num_servers=2, **SERVER_KW)
    engine.setup(model, tok)
    hf = HFGenerateEngine()
    hf.setup(model, tok)
    prompts = [torch.tensor(tok(t)["input_ids"]) for t in ("Q: 1+1=", "a longer prompt 12*7 =", "x", "(3+4)*2")]
    pids = [s.process.pid for s in engine.servers]
    yield model, tok, engine, hf, prompts
    engine.teardown()
    deadline = time.monotonic() + 30
    while any(group_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(group_alive(p) for p in pids), "a launched server outlived teardown"


def greedy(engine, prompts, version):
    return engine.generate(SampleRequest(prompts, 1, SAMPLING, [0] * len(prompts), greedy=True,
                                         policy_version=version))


def train_steps(model, tok, steps):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    text = torch.tensor([tok("Q: 1+1=2 and 12*7=84")["input_ids"]])
    for _ in range(steps):
        loss = model(input_ids=text, labels=text).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_greedy_equals_hf_generate_after_each_of_three_steps(setup):
    model, tok, engine, hf, prompts = setup
    version = engine.weight_version
    assert torch.equal(greedy(engine, prompts, version).completion_ids, greedy(hf, prompts, None).completion_ids)
    for _ in range(3):
        train_steps(model, tok, 1)
        version += 1
        engine.sync_weights(model, version)
        ours, ref = greedy(engine, prompts, version), greedy(hf, prompts, None)
        assert torch.equal(ours.completion_ids, ref.completion_ids) and ours.weight_version == version
        sampled = engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3, 4], policy_version=version))
        metrics = mismatch_metrics(sampled.sampler_logprobs, trainer_logprobs(model, tok, prompts, 4, sampled, 1.0),
                                   sampled.completion_mask)
        assert DEFAULT_CHECK(metrics)  # synced: within the float32 default (1e-3)


def test_two_servers_give_the_samples_of_one(setup):
    model, tok, engine, hf, prompts = setup
    request = SampleRequest(prompts, 4, SAMPLING, [11, 12, 13, 14], policy_version=engine.weight_version)
    both = engine.generate(request)
    clients = engine.clients
    try:
        engine.clients = clients[:1]
        one = engine.generate(request)
        engine.clients = clients[1:]
        other = engine.generate(request)
    finally:
        engine.clients = clients
    assert torch.equal(both.completion_ids, one.completion_ids) and torch.equal(both.completion_ids, other.completion_ids)
    assert torch.equal(both.sampler_logprobs, one.sampler_logprobs)


def test_stale_versions_are_refused(setup):
    model, tok, engine, hf, prompts = setup
    version = engine.weight_version
    with pytest.raises(StaleWeightsError, match="policy is at version"):  # the trainer moved on without a sync
        engine.generate(SampleRequest(prompts, 1, SAMPLING, [0] * 4, greedy=True, policy_version=version + 1))
    behind = ServerClient(engine.clients[1].url)
    behind.post("/update_weight_version", {"new_version": "stale"})  # a server that missed the sync
    try:
        with pytest.raises(StaleWeightsError, match="holds weight version stale"):
            greedy(engine, prompts, version)
    finally:
        behind.post("/update_weight_version", {"new_version": str(version)})
    assert greedy(engine, prompts, version).weight_version == version


def test_skipped_sync_trips_the_default_self_check(setup):
    model, tok, engine, hf, prompts = setup
    train_steps(model, tok, 1)  # one step, never synced: the servers sample from the old weights
    stale = engine.generate(SampleRequest(prompts, 4, SAMPLING, [1, 2, 3, 4], policy_version=engine.weight_version))
    metrics = mismatch_metrics(stale.sampler_logprobs, trainer_logprobs(model, tok, prompts, 4, stale, 1.0),
                               stale.completion_mask)
    with pytest.raises(SamplerMismatchError, match="logp_diff_max"):
        DEFAULT_CHECK(metrics)
    engine.sync_weights(model, engine.weight_version + 1)


def test_partial_weight_stream_is_refused_and_the_version_does_not_advance(setup, monkeypatch):
    model, tok, engine, hf, prompts = setup
    version = engine.weight_version
    full = ranks_module.policy_weights  # the stream rank 0 pushes

    def without_layer_one(policy):
        return ((n, t) for n, t in full(policy) if ".layers.1." not in n)

    monkeypatch.setattr(ranks_module, "policy_weights", without_layer_one)
    with pytest.raises(IncompleteWeightsError, match=r"ended without \d+ of the \d+ tensors.*layers\.1\."):
        engine.sync_weights(model, version + 1)
    assert engine.weight_version == version
    with pytest.raises(StaleWeightsError):
        greedy(engine, prompts, version + 1)

    def misshaped(policy):
        for n, t in full(policy):
            yield n, (t[:-1] if n.endswith("o_proj.weight") else t)

    monkeypatch.setattr(ranks_module, "policy_weights", misshaped)
    with pytest.raises(IncompleteWeightsError, match="of shape"):
        engine.sync_weights(model, version + 1)
    assert engine.weight_version == version and all(
        ServerClient(c.url).get("/weight_info")["weight_version"] == str(version) for c in engine.clients)


def test_a_killed_launched_server_is_restarted_with_the_current_weights(setup):
    model, tok, engine, hf, prompts = setup
    train_steps(model, tok, 1)
    version = engine.weight_version + 1
    engine.sync_weights(model, version)
    before = greedy(engine, prompts, version)
    dead = engine.servers[1].process.pid
    os.killpg(dead, signal.SIGKILL)
    engine.servers[1].process.wait(timeout=30)
    after = greedy(engine, prompts, version)  # group 1 and 3 go to the restarted server
    assert engine.servers[1].alive and engine.servers[1].process.pid != dead
    assert torch.equal(before.completion_ids, after.completion_ids)
    assert torch.equal(after.completion_ids, greedy(hf, prompts, None).completion_ids)


def test_a_server_killed_while_requests_are_in_flight_is_restarted_and_stays_up(setup):
    """The restart happens on the main thread after the request pool (a server started from a worker thread would
    get the death signal when that thread exits): the restarted server still answers at the next rollout."""
    model, tok, engine, hf, prompts = setup
    version = engine.weight_version
    before = greedy(engine, prompts, version)
    victim = engine.clients[1]
    post = victim.post
    killed = []

    def kill_then_post(path, body=None, timeout_s=None):
        if path == "/inference/v1/generate" and not killed:
            killed.append(engine.servers[1].process.pid)
            os.killpg(killed[0], signal.SIGKILL)
            engine.servers[1].process.wait(timeout=30)
        return post(path, body, timeout_s)

    victim.post = kill_then_post
    try:
        during = greedy(engine, prompts, version)
    finally:
        victim.post = post
    assert killed and engine.servers[1].alive and engine.servers[1].process.pid != killed[0]
    assert torch.equal(before.completion_ids, during.completion_ids)
    time.sleep(1.0)
    assert engine.servers[1].alive  # not killed when the request threads exited
    assert torch.equal(greedy(engine, prompts, version).completion_ids, before.completion_ids)


def test_a_server_that_died_under_a_background_request_is_restarted_by_recover_on_the_main_thread(setup):
    """Asynchronous rollouts sample on a background thread, which must not start a server (the kernel would stop it
    when that thread exits): the request raises EngineRecoveryNeeded, and ``recover()`` on the main thread restarts
    the server with the current weights (tests/test_async_rollouts.py runs the pipeline's resample)."""
    model, tok, engine, hf, prompts = setup
    version = engine.weight_version
    before = greedy(engine, prompts, version)
    dead = engine.servers[0].process.pid
    os.killpg(dead, signal.SIGKILL)
    engine.servers[0].process.wait(timeout=30)
    raised: list[BaseException] = []

    def background() -> None:
        try:
            greedy(engine, prompts, version)
        except BaseException as err:  # noqa: BLE001 - checked on the main thread
            raised.append(err)

    thread = threading.Thread(target=background)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive() and len(raised) == 1 and isinstance(raised[0], EngineRecoveryNeeded), raised
    assert "died during a background request" in str(raised[0]) and not engine.servers[0].alive
    engine.recover()
    assert engine.servers[0].alive and engine.servers[0].process.pid != dead
    assert torch.equal(greedy(engine, prompts, version).completion_ids, before.completion_ids)
    time.sleep(1.0)
    assert engine.servers[0].alive


def test_unreachable_urls_are_named_at_setup_and_mid_run(setup, tmp_path):
    model, tok, engine, hf, prompts = setup
    from components.vllm_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    connected = VLLMServerEngine(urls=[url], **SERVER_KW)
    with pytest.raises(ServerError, match=f"(?s)no vLLM server answers at {url}.*api_server"):
        connected.setup(model, tok)
    assert not connected.clients
    from test_engines_vllm_module import vllm_module  # the module refuses it when built, before any model loads
    from test_resume import tokenizer_dir

    with pytest.raises(ServerError, match=f"(?s)model.engine.urls.*{url}.*api_server"):
        vllm_module(tokenizer_dir(tmp_path), engine=VLLMServerEngine(urls=[url], **SERVER_KW))
    live = VLLMServerEngine(urls=[engine.clients[0].url], max_retries=1, **SERVER_KW)
    live.setup(model, tok)  # connects and pushes the policy (version 0 on that server)
    live.clients[0].url = url  # the server "went away"
    live.clients[0].retry_wait_s, live.clients[0].timeout_s = 0.1, 5.0
    start = time.monotonic()
    with pytest.raises(server_module.ServerUnavailableError, match=url):
        greedy(live, prompts, 0)
    assert time.monotonic() - start < 30
    live.teardown()
    engine.sync_weights(model, engine.weight_version + 1)  # give the shared server the engine's version back


def _fit(root: Path, url: str, steps: int, ckpt_in: str | None = None, **module_kw) -> tuple[dict, list]:
    """``test_engines_vllm_module._fit`` against a running server (connected: setup pushes the policy's weights):
    the final weights and the (seeds, completion ids, thread) of every rollout."""
    from test_engines_vllm_module import _fit as fit_with

    return fit_with(root, steps, ckpt_in, engine=VLLMServerEngine(urls=[url], **SERVER_KW), **module_kw)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_interrupted_run_resumes_exactly(setup, tmp_path, asynchronous):
    """4 steps straight vs 2 steps + resume from last.ckpt for 2 more, through one running server: the resumed
    steps draw the same seeds and completions, and the weights end bit-identical. With asynchronous rollouts the
    requests go out from the background thread and the checkpoint holds the batch in flight (5 loader batches are
    sampled for 4 updates: 3 before the checkpoint at step 2, 2 after the resume)."""
    from prpo_lightning.config import AsyncRolloutConfig

    model, tok, engine, hf, prompts = setup
    url = engine.clients[0].url
    kw = {"async_rollout": AsyncRolloutConfig(enabled=True)} if asynchronous else {}
    try:
        full, full_samples = _fit(tmp_path / "a", url, 4, **kw)
        _, first = _fit(tmp_path / "c", url, 2, **kw)
        resumed, rest = _fit(tmp_path / "d", url, 4, ckpt_in=str(tmp_path / "c" / "last.ckpt"), **kw)
    finally:
        engine.sync_weights(model, engine.weight_version + 1)  # the shared servers back to the fixture's weights
    assert (len(full_samples), len(first), len(rest)) == ((5, 3, 2) if asynchronous else (4, 2, 2))
    for (seeds_a, ids_a, _), (seeds_b, ids_b, _) in zip(full_samples, first + rest):
        assert seeds_a == seeds_b and torch.equal(ids_a, ids_b)
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name


def test_cli_fit_demo_config_with_the_server_engine(tmp_path):
    """Through ``prpo-fit`` (a subprocess): the demo config with VLLMServerEngine, 3 steps, the default self-check;
    the server is gone when the command returns."""
    from test_resume import tokenizer_dir

    args = [
        sys.executable, "-m", "prpo_lightning.cli", "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        "--model.engine=components.engines.VLLMServerEngine", "--model.engine.init_args.kv_cache_memory_gib=0.1",
        "--model.engine.init_args.max_model_len=256", f"--model.engine.init_args.workdir={tmp_path / 'served'}",
        "--model.engine.init_args.startup_timeout_s=400",
        "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.callbacks=[]",
        "--model.policy=null", f"--model.policy_config={json.dumps(qwen2_config(128))}",
        f"--model.tokenizer={tokenizer_dir(tmp_path)}", "--model.sampling.num_generations=4",
        "--model.sampling.max_new_tokens=16", "--data.init_args.batch_size=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert list((tmp_path / "served").glob("server-*.log")), "no server was launched in the workdir"
    leftover = subprocess.run(["pgrep", "-f", f"api_server --model {tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


KILLED_TRAINER = """
import sys, time, torch
sys.path[:0] = [{repo!r}, {tests!r}]
from components.engines import VLLMServerEngine
from test_engines_vllm import qwen2_config
from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer
tok = load_tokenizer({tok!r})
engine = VLLMServerEngine(workdir={work!r}, max_model_len=256, kv_cache_memory_gib=0.1, startup_timeout_s=400)
engine.setup(load_causal_lm(config=qwen2_config(len(tok)), seed=0), tok)
print("SERVER", engine.servers[0].process.pid, flush=True)
time.sleep(600)
"""


def test_a_server_does_not_outlive_a_trainer_killed_with_sigkill(tmp_path):
    from test_resume import tokenizer_dir

    script = KILLED_TRAINER.format(repo=str(REPO), tests=str(REPO / "tests"), tok=tokenizer_dir(tmp_path),
                                   work=str(tmp_path / "served"))
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = ""
        deadline = time.monotonic() + 450
        while not line.startswith("SERVER") and time.monotonic() < deadline and trainer.poll() is None:
            line = trainer.stdout.readline()
        assert line.startswith("SERVER"), f"the trainer never reported its server (exit {trainer.poll()})"
        server = int(line.split()[1])
        assert group_alive(server)
        trainer.kill()  # SIGKILL: no Python cleanup runs in the trainer
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 60
        while group_alive(server) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not group_alive(server), "the server outlived its trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_the_gpu_check_served_section_passes_on_cpu(tmp_path):
    """``benchmarks/gpu_check.py --dry-run --only served`` in the vLLM environment: the section a lent GPU runs
    (there with NCCL weight transfer) passes here with the shared-folder transfer."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--only", "served",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entry = json.loads((out / "gpu_check.json").read_text())["sections"]["served"]
    assert entry["status"] == "passed", entry
    checks = entry["checks"]
    assert checks["greedy_equals_hf_before_and_after_sync"]["each"] == [True, True]
    assert checks["synced_logp_diff_max"]["value"] <= 1e-3 < checks["never_synced_is_caught"]["value"]
    assert "## Served rollouts (issue 22)" in (out / "gpu_check.md").read_text()
