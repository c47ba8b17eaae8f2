"""PRPOModule with the real vLLM CPU engine, trained through Lightning (run in .venv-vllm; skipped without vLLM).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=$PWD .venv-vllm/bin/python -m pytest -q tests/test_engines_vllm_module.py
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import lightning as L  # noqa: E402
import torch  # noqa: E402

from components.engines import HFGenerateEngine, VLLMEngine  # noqa: E402
from prpo_lightning.config import LossConfig, OptimConfig  # noqa: E402
from prpo_lightning.data import ArithmeticDataModule, collate_prompts  # noqa: E402
from prpo_lightning.rollout.engine import RolloutEngine  # noqa: E402
from prpo_lightning.config import MismatchCheck, SamplerMismatchError  # noqa: E402
from prpo_lightning import SampleRequest  # noqa: E402
from test_engines_vllm import SAMPLING, qwen2_config  # noqa: E402
from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# float32 on CPU: vLLM and the trainer agree to ~1e-6 per token (test_engines_vllm.py); a missed sync after one
# lr-5e-2 Adam step moves log-probs by far more than this
STRICT = MismatchCheck(metric="logp_diff_max", threshold=1e-3, mode="raise")


def vllm_engine() -> VLLMEngine:
    return VLLMEngine(kv_cache_memory_gib=0.1, max_model_len=256)


def vllm_module(tok: str, engine: RolloutEngine | None = None, **kw):
    kw.setdefault("loss", LossConfig(kl_coef=0.0))
    kw.setdefault("optim", OptimConfig(lr=5e-2, micro_batch_size=8))
    return make_module(tok, policy_config=qwen2_config(128), engine=engine or vllm_engine(), rollout_check=STRICT, **kw)


class GreedyAgreement(L.Callback):
    """After every training step (the module has synced), greedy vLLM completions vs HF ``generate``'s."""

    def __init__(self, prompts: list[torch.Tensor]) -> None:
        self.prompts, self.equal, self.versions = prompts, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        hf = HFGenerateEngine()
        hf.setup(pl_module.policy, pl_module.tokenizer)
        seeds = [0] * len(self.prompts)
        ours = pl_module.engine.generate(SampleRequest(self.prompts, 1, SAMPLING, seeds, greedy=True,
                                         policy_version=pl_module.collector.weights_version))
        ref = hf.generate(SampleRequest(self.prompts, 1, SAMPLING, seeds, greedy=True))
        self.equal.append(torch.equal(ours.completion_ids, ref.completion_ids))
        self.versions.append(pl_module.engine.weight_version)


def test_training_syncs_vllm_after_every_step(tmp_path):
    tok = tokenizer_dir(tmp_path)
    module = vllm_module(tok)
    module.configure_model()
    initial = {k: v.clone() for k, v in module.policy.state_dict().items()}
    prompts = [torch.tensor(module.tokenizer(t)["input_ids"]) for t in ("1+1=", "23+4=", "7*8=")]
    agreement = GreedyAgreement(prompts)
    trainer = make_trainer(tmp_path, 3, callbacks=[agreement])
    trainer.fit(module, ToyPrompts(n=6, batch_size=2, seed=1))
    assert agreement.versions == [1, 2, 3] and all(agreement.equal)
    assert any(not torch.equal(initial[k], v) for k, v in module.policy.state_dict().items()), "weights moved"
    m = trainer.callback_metrics
    assert float(m["train/rollout/logp_diff_max"]) < 1e-3 and float(m["train/rollout/kl"]) < 1e-3
    assert abs(float(m["train/is/weight_mean"]) - 1.0) < 1e-3


class ForgetfulVLLM(VLLMEngine):
    """Bumps the version but never streams the weights (the TRL #5312 / verl #7904 bug)."""

    def sync_weights(self, policy, version=None) -> None:
        RolloutEngine.sync_weights(self, policy, version)


def test_skipped_sync_trips_the_self_check(tmp_path):
    module = vllm_module(tokenizer_dir(tmp_path), engine=ForgetfulVLLM(kv_cache_memory_gib=0.1, max_model_len=256))
    with pytest.raises(SamplerMismatchError, match="logp_diff_max"):
        make_trainer(tmp_path, 2).fit(module, ToyPrompts(n=6, batch_size=2, seed=1))
    assert module.global_step == 1  # the first step (fresh weights) passed, the second caught the stale engine


def _fit(root: Path, steps: int, ckpt_in: str | None = None, **module_kw) -> tuple[dict, list]:
    """A ``steps``-step run that checkpoints after every step (``<root>/last.ckpt``, as a real run would: a
    checkpoint written by ``trainer.save_checkpoint`` after ``fit`` returned marks the epoch finished, so resuming
    from it starts the next epoch's shuffle instead of the rest of this one). Returns the final weights and the
    (seeds, completion ids) of every rollout."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = vllm_module(tokenizer_dir(root), **module_kw)
    samples: list = []
    sample = module.engine.sample

    def recording_sample(request):
        result = sample(request)
        samples.append((list(request.seeds), result.completion_ids.clone(), threading.current_thread().name))
        return result

    module.engine.sample = recording_sample
    every_step = ModelCheckpoint(dirpath=str(root), every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer = make_trainer(root, steps, callbacks=[every_step], enable_checkpointing=True)
    trainer.fit(module, ToyPrompts(n=8, batch_size=2, seed=1), ckpt_path=ckpt_in)
    return {k: v.clone() for k, v in module.policy.state_dict().items()}, samples


def test_same_seed_same_run_and_exact_resume(tmp_path):
    """8 prompts / batch 2: the resume at step 2 is mid-epoch; steps 3-4 of the resumed run draw the same seeds
    and completions as the straight run, and the weights end bit-identical."""
    full, full_samples = _fit(tmp_path / "a", 4)
    again, again_samples = _fit(tmp_path / "b", 4)
    _, first_samples = _fit(tmp_path / "c", 2)
    resumed, resumed_samples = _fit(tmp_path / "d", 4, ckpt_in=str(tmp_path / "c" / "last.ckpt"))
    assert len(full_samples) == 4 and len(first_samples) == 2 and len(resumed_samples) == 2
    for (seeds_a, ids_a, _), (seeds_b, ids_b, _) in zip(full_samples, again_samples):
        assert seeds_a == seeds_b and torch.equal(ids_a, ids_b)
    for (seeds_a, ids_a, _), (seeds_c, ids_c, _) in zip(full_samples, first_samples + resumed_samples):
        assert seeds_a == seeds_c and torch.equal(ids_a, ids_c)
    for name, value in full.items():
        assert torch.equal(value, again[name]), name
        assert torch.equal(value, resumed[name]), name


def test_async_rollouts_sample_in_the_background_and_resume_exactly(tmp_path):
    """``model.async_rollout`` with vLLM and PRPO's entropy segmenter: every batch after the first is sampled in the
    background thread, one version before its update (the strict self-check, which needs equal versions, only
    measures those rows); a run checkpointed at step 2 and resumed ends with the straight run's weights."""
    from components.aligners import PRPOAligner
    from components.prms import EquationCheckPRM
    from components.segmenters import EntropySpikeSegmenter
    from prpo_lightning.config import AsyncRolloutConfig

    kw = dict(aligner=PRPOAligner(), segmenter=EntropySpikeSegmenter(min_gap=2), prm=EquationCheckPRM(),
              async_rollout=AsyncRolloutConfig(enabled=True))
    full, full_samples = _fit(tmp_path / "a", 4, **kw)
    _, first_samples = _fit(tmp_path / "c", 2, **kw)
    resumed, resumed_samples = _fit(tmp_path / "d", 4, ckpt_in=str(tmp_path / "c" / "last.ckpt"), **kw)
    assert {name for _, _, name in full_samples} == {"prpo-async-rollouts"} and len(full_samples) == 5
    # the straight run sampled 5 loader batches (4 updates + the one launched last); the killed one 3, of which the
    # checkpoint at step 2 holds the third in flight: the resumed run samples the last two
    assert len(first_samples) == 3 and len(resumed_samples) == 2
    for (seeds_a, ids_a, _), (seeds_c, ids_c, _) in zip(full_samples, first_samples + resumed_samples):
        assert seeds_a == seeds_c and torch.equal(ids_a, ids_c)
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name


def test_prpo_with_entropy_spike_segmenter(tmp_path):
    from components.aligners import PRPOAligner
    from components.prms import EquationCheckPRM
    from components.segmenters import EntropySpikeSegmenter

    module = vllm_module(tokenizer_dir(tmp_path), aligner=PRPOAligner(), segmenter=EntropySpikeSegmenter(min_gap=2),
                         prm=EquationCheckPRM())
    assert module.plan.old_logprobs and not module.plan.generation_entropies  # the trainer computes them
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, ToyPrompts(n=4, batch_size=2, seed=1))
    assert trainer.global_step == 2 and float(trainer.callback_metrics["train/segments/per_completion"]) >= 1


def test_cli_fit_demo_config_with_vllm(tmp_path, monkeypatch, capfd):
    """Through the CLI with the default self-check; vLLM's own ~30 start-up log lines stay off the console
    (``model.engine.log_level: ERROR``)."""
    import re

    from prpo_lightning.cli import cli_main

    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    args = [
        "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        "--model.engine=components.engines.VLLMEngine", "--model.engine.init_args.kv_cache_memory_gib=0.1",
        "--model.engine.init_args.max_model_len=256", "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.callbacks=[]",
        "--model.policy=null", f"--model.policy_config={json.dumps(qwen2_config(128))}",
        f"--model.tokenizer={tokenizer_dir(tmp_path)}", "--model.sampling.num_generations=4",
        "--model.sampling.max_new_tokens=16", "--data.init_args.batch_size=2",
    ]
    cli = cli_main(args)
    assert isinstance(cli.model.engine, VLLMEngine) and cli.trainer.global_step == 3
    assert float(cli.trainer.callback_metrics["train/rollout/logp_diff_max"]) < 1e-3
    out, err = capfd.readouterr()
    vllm_lines = [line for line in (out + err).splitlines() if re.search(r"\) (INFO|WARNING) \d\d-\d\d ", line)]
    assert not vllm_lines, vllm_lines[:5]


def test_greedy_evaluation_through_vllm_equals_hf(tmp_path):
    dm = ArithmeticDataModule(num_train=8, num_eval=6, seed=0)
    dm.setup("fit")
    rows = [dm.eval_dataloader().dataset[i] for i in range(6)]
    batch = collate_prompts(rows)
    from components.verifiers import SympyMathVerifier

    results = {}
    tok = tokenizer_dir(tmp_path)
    for name, engine in (("vllm", vllm_engine()), ("hf", HFGenerateEngine())):
        module = vllm_module(tok, engine=engine, verifier=SympyMathVerifier(num_workers=1), sampling=SAMPLING.__class__(max_new_tokens=24, max_prompt_length=128),
                             prompt_template="Q: {problem}\nA:\n")
        module.configure_model()
        rollout = module.generate_and_grade(batch, greedy=True)
        module.collector.teardown_engine()
        results[name] = (rollout.completions, [v.status for v in rollout.verdicts])
    assert results["vllm"] == results["hf"]  # same completions, hence the same pass@1


# ---------------------------------------------------------------- DDP: 2 gloo ranks, one vLLM engine each
DDP_ROWS = ["1+1=", "2+3=", "4+4=", "5+7="]  # 4 prompts per step: 2 per rank
DDP_STEPS = 2


def _ddp_run(out: Path, devices: int, tok: str):
    """``DDP_STEPS`` steps over ``DDP_ROWS`` on ``devices`` ranks; saves each rank's records and weights."""
    from test_ddp import RecordingModule

    from prpo_lightning.config import SamplingConfig

    rows = [{"id": i, "problem": p, "answer": "0"} for i, p in enumerate(DDP_ROWS)]
    # per-group seeds: a prompt's completions do not depend on the rank that draws it
    sampling = SamplingConfig(num_generations=4, max_new_tokens=8, max_prompt_length=32, seed_per_group=True)
    module = vllm_module(tok, module_cls=RecordingModule, sampling=sampling)
    trainer = make_trainer(out, DDP_STEPS, **({"strategy": "ddp", "devices": devices} if devices > 1 else {}))
    trainer.fit(module, ToyPrompts(rows=rows, batch_size=len(DDP_ROWS) // devices, seed=1))
    check = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/rollout/")}
    torch.save({"records": module.records, "state": module.policy.state_dict(), "check": check},
               out / f"vllm_rank{trainer.global_rank}_of{devices}.pt")
    return module, check


def test_ddp_two_ranks_each_with_vllm_match_single_process(tmp_path):
    """Each rank builds its own in-process vLLM engine (``external_launcher``); every prompt group gets the same
    completions and advantages as in one process, and the self-check metrics are the global batch's on both
    ranks (so the raise/warn decision cannot differ between ranks)."""
    import subprocess
    import sys

    from test_ddp import _by_group, _free_port

    tok = tokenizer_dir(tmp_path)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path), tok],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    single, single_check = _ddp_run(tmp_path, 1, tok)
    ranks = [torch.load(tmp_path / f"vllm_rank{r}_of2.pt", weights_only=False) for r in (0, 1)]
    ref, got = _by_group(single.records), {}
    for r in ranks:
        for key, val in _by_group(r["records"]).items():
            assert key not in got, f"group {key} was generated on two ranks"
            got[key] = val
    assert set(got) == set(ref) and len(ref) == DDP_STEPS * len(DDP_ROWS)  # keys: (step after update, prompt id)
    assert {v["rank"] for v in got.values()} == {0, 1}
    for key in ref:
        assert got[key]["n"] == ref[key]["n"] == 4
        assert torch.equal(got[key]["ids"], ref[key]["ids"]), f"{key}: completions differ"
        torch.testing.assert_close(got[key]["adv"], ref[key]["adv"], rtol=0, atol=0)
    assert any(bool(v["adv"].abs().sum() > 0) for v in ref.values()), "degenerate test: all advantages are 0"
    # the self-check saw the global batch on both ranks: same values, and those of the single process
    assert ranks[0]["check"] == ranks[1]["check"] and set(single_check) == set(ranks[0]["check"]) != set()
    for name, value in single_check.items():
        assert ranks[0]["check"][name] == pytest.approx(value, rel=1e-3, abs=1e-6), name
    # Adam divides by sqrt(v): the all-reduce sums gradients in another order, and an element whose gradient is
    # near 0 can move by a small fraction of one lr step (measured: 2.7e-5 = 5e-4 lr after 2 steps)
    lr = single.optim_cfg.lr
    for name, w in single.policy.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], w, rtol=0, atol=1e-2 * lr)
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name])


if __name__ == "__main__":  # one DDP worker of the test above (Lightning re-executes it for rank 1)
    import sys

    torch.set_num_threads(1)
    _ddp_run(Path(sys.argv[1]), 2, sys.argv[2])


def test_sigterm_exits_143_and_leaves_no_vllm_model_folder(tmp_path):
    """Issue 27 item 9: a run stopped by SIGTERM (prpo-fit saves and exits 143) removes vLLM's model folder on the
    way out (kill -9 leaves it, and the next start removes it: test_engines_vllm.py)."""
    import signal
    import subprocess
    import sys

    temp = tmp_path / "tmp"
    temp.mkdir()
    killer = ["--trainer.callbacks+=test_preemption.SignalOnce", "--trainer.callbacks.at_step=1",
              f"--trainer.callbacks.flag={tmp_path / 'signalled'}", f"--trainer.callbacks.starts={tmp_path / 'log'}",
              f"--trainer.callbacks.signum={int(signal.SIGTERM)}"]
    args = [
        "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        "--model.engine=components.engines.VLLMEngine", "--model.engine.init_args.kv_cache_memory_gib=0.1",
        "--model.engine.init_args.max_model_len=256", "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.callbacks=[]", *killer,
        "--model.policy=null", f"--model.policy_config={json.dumps(qwen2_config(128))}",
        f"--model.tokenizer={tokenizer_dir(tmp_path)}", "--model.sampling.num_generations=4",
        "--model.sampling.max_new_tokens=16", "--data.init_args.batch_size=2",
    ]
    env = {**os.environ, "TMPDIR": str(temp), "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    code = "import sys; from prpo_lightning.cli import main; sys.argv[0] = 'prpo-fit'; main()"
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 143, (proc.stdout + proc.stderr)[-4000:]
    assert (tmp_path / "signalled").exists()
    assert not [p.name for p in temp.iterdir() if p.name.startswith("prpo_vllm_")]
