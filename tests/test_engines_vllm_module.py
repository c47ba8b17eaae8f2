"""PRPOModule with the real vLLM CPU engine, trained through Lightning (run in .venv-vllm; skipped without vLLM).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=$PWD .venv-vllm/bin/python -m pytest -q tests/test_engines_vllm_module.py
"""

from __future__ import annotations

import json
import os
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
from prpo_lightning.engine import RolloutEngine  # noqa: E402
from prpo_lightning.offpolicy import MismatchCheck, SamplerMismatchError  # noqa: E402
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
        ours = pl_module.engine.generate(self.prompts, 1, SAMPLING, seeds, greedy=True,
                                         policy_version=pl_module._weights_version)
        ref = hf.generate(self.prompts, 1, SAMPLING, seeds, greedy=True)
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


def _fit(root: Path, steps: int, ckpt_in: str | None = None) -> tuple[dict, list]:
    """A ``steps``-step run that checkpoints after every step (``<root>/last.ckpt``, as a real run would: a
    checkpoint written by ``trainer.save_checkpoint`` after ``fit`` returned marks the epoch finished, so resuming
    from it starts the next epoch's shuffle instead of the rest of this one). Returns the final weights and the
    (seeds, completion ids) of every rollout."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = vllm_module(tokenizer_dir(root))
    samples: list = []
    sample = module.engine.sample

    def recording_sample(prompts, g, sampling, seeds, *args):
        result = sample(prompts, g, sampling, seeds, *args)
        samples.append((list(seeds), result.completion_ids.clone()))
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
    for (seeds_a, ids_a), (seeds_b, ids_b) in zip(full_samples, again_samples):
        assert seeds_a == seeds_b and torch.equal(ids_a, ids_b)
    for (seeds_a, ids_a), (seeds_c, ids_c) in zip(full_samples, first_samples + resumed_samples):
        assert seeds_a == seeds_c and torch.equal(ids_a, ids_c)
    for name, value in full.items():
        assert torch.equal(value, again[name]), name
        assert torch.equal(value, resumed[name]), name


def test_prpo_with_entropy_spike_segmenter(tmp_path):
    from components.aligners import PRPOAligner
    from components.prms import EquationCheckPRM
    from components.segmenters import EntropySpikeSegmenter

    module = vllm_module(tokenizer_dir(tmp_path), aligner=PRPOAligner(), segmenter=EntropySpikeSegmenter(min_gap=2),
                         prm=EquationCheckPRM())
    assert module.needs_rollout_logprobs and not module.records_generation_entropies  # the trainer computes them
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, ToyPrompts(n=4, batch_size=2, seed=1))
    assert trainer.global_step == 2 and float(trainer.callback_metrics["train/segments/per_completion"]) >= 1


def test_cli_fit_demo_config_with_vllm(tmp_path, monkeypatch):
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
        module.teardown_engine()
        results[name] = (rollout.completions, [v.status for v in rollout.verdicts])
    assert results["vllm"] == results["hf"]  # same completions, hence the same pass@1
