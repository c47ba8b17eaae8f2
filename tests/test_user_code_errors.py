"""Smaller reliability items (issue 27, item 9): ``sys.exit`` in user code is a named error; a configuration error
prints its message first; vLLM's ``max_model_len`` and ``kv_cache_memory_gib`` are checked at start with our own
messages; model folders of killed vLLM runs are removed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from helpers import tiny_qwen2_config
from test_resume import REPO, cli_fit_args, tokenizer_dir

from prpo_lightning.cli import cli_main
from prpo_lightning.scoring.faults import ComponentError
from prpo_lightning.scoring.pipeline import guarded_call
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict


def exit_reward(completion: str, answer: str, **row) -> float:
    sys.exit(3)


class ExitingVerifier(OutcomeVerifier):
    def verify(self, completion: str, gold: str) -> Verdict:
        raise SystemExit("no more")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prpo-fit"])


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return tokenizer_dir(tmp_path_factory.mktemp("user_tok"))


@pytest.mark.slow
def test_sys_exit_in_a_reward_function_is_a_named_error(tmp_path, tok):
    args = [a for a in cli_fit_args(tmp_path, tok, 1, "--trainer.enable_checkpointing=false")
            if not a.startswith("--model.verifier=")]
    args += ["--model.verifier=components.rewards.CallableReward",
             "--model.verifier.function=test_user_code_errors:exit_reward"]
    with pytest.raises(Exception, match=r"reward function test_user_code_errors:exit_reward called sys\.exit\(3\) on "
                                        r"row 0") as err:
        cli_main(args)  # before: SystemExit(3), the process ended with code 3 and no message
    assert not isinstance(err.value, SystemExit)


def test_sys_exit_in_a_verifier_or_prm_is_a_named_error():
    verifier = ExitingVerifier()
    with pytest.raises(ComponentError, match=r"verifier ExitingVerifier\.verify_batch called sys\.exit\('no more'\)"):
        guarded_call("verifier", verifier, "verify_batch", lambda: verifier.verify_batch(["a"], ["b"]), 1)

    class ExitingPRM:
        def score(self, batch, tokenizer):
            sys.exit(0)

    prm = ExitingPRM()
    with pytest.raises(ComponentError, match=r"PRM ExitingPRM\.score called sys\.exit\(0\)"):
        guarded_call("PRM", prm, "score", lambda: prm.score(None, None), 1)


@pytest.mark.slow
def test_config_error_prints_its_message_first_and_exits_2(tmp_path, tok):
    args = cli_fit_args(tmp_path, tok, 1, "--model.optim.lr=-1.0")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("PRPO_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "-c", "import sys; from prpo_lightning.cli import main; sys.argv[0] = "
                           "'prpo-fit'; main()", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Seed set")]
    assert lines[0] == "prpo-fit: error: model.optim.lr must be > 0 (the peak learning rate); got -1.0", lines
    assert "Traceback" not in proc.stderr and len(lines) <= 3


@pytest.mark.slow
def test_vllm_max_model_len_is_checked_at_start(tmp_path, tok):
    args = cli_fit_args(tmp_path, tok, 1, "--trainer.enable_checkpointing=false",
                        "--model.engine=components.engine_vllm.VLLMEngine", "--model.engine.max_model_len=36")
    with pytest.raises(ValueError, match=r"model\.engine\.max_model_len 36 is smaller than model\.sampling\."
                                         r"max_prompt_length 32 \+ model\.sampling\.max_new_tokens 8 = 40"):
        cli_main(args[1:], run=False)  # before: accepted; the run failed at the first prompt longer than 28 tokens
    cli = cli_main([*args[1:-1], "--model.engine.max_model_len=40"], run=False)
    assert cli.model.engine.max_model_len == 40


def test_vllm_kv_cache_too_small_gets_our_message_before_vllm_starts(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    from components.engine_vllm import VLLMEngine
    from prpo_lightning.runtime.models import load_tokenizer

    cfg = dict(tiny_qwen2_config())  # 2 layers, 2 KV heads of 8 dims, float32: 256 bytes per token
    policy = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    engine = VLLMEngine(kv_cache_memory_gib=1e-5, max_model_len=64)  # 10737 bytes: 41 tokens
    with pytest.raises(ValueError, match=r"kv_cache_memory_gib 1e-05 holds 41 tokens of KV cache \(256 bytes per "
                                         r"token for this policy\), but one sequence of max_model_len 64 needs"):
        engine.setup(policy, load_tokenizer(tok))


def test_model_folders_of_killed_vllm_runs_are_removed(tmp_path):
    from components.engine_vllm import remove_stale_model_dirs

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, timeout=60)
        host = socket.gethostname()
        names = {"dead": f"prpo_vllm_{host}_{int(dead.stdout)}_abc", "live": f"prpo_vllm_{host}_{live.pid}_abc",
                 "other_host": f"prpo_vllm_otherhost_{int(dead.stdout)}_abc",
                 "mine": f"prpo_vllm_{host}_{os.getpid()}_x"}
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "config.json").write_text("{}")
        removed = remove_stale_model_dirs(str(tmp_path))
        assert removed == [str(tmp_path / names["dead"])]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")
    finally:
        live.kill()
        live.wait(timeout=30)
    assert tempfile.gettempdir()
