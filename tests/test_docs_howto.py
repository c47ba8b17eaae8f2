"""The how-to guides' code (``docs/howto/*.py``, literal-included in the docs) runs and behaves as the pages say.

Also checks that every metric a training step logs is explained in the metrics glossary (``docs/metrics.rst``).
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from helpers import build_char_tokenizer, tiny_qwen2_config

ROOT = Path(__file__).resolve().parents[1]
HOWTO = ROOT / "docs" / "howto"
sys.path.insert(0, str(HOWTO))


def _load(name: str):
    return importlib.import_module(name)


def test_custom_segmenter_tiles_completions() -> None:
    mod = _load("custom_segmenter")
    spans = mod.demo()
    assert spans == [[(0, 10), (10, 21), (21, 26)], [(0, 4)]]
    with pytest.raises(ValueError):
        mod.LineSegmenter(max_segments=0)


def test_custom_segmenter_caps_segments_and_handles_empty_rows() -> None:
    from prpo_lightning import RolloutBatch
    from prpo_lightning.demo.policy import build_tokenizer

    mod = _load("custom_segmenter")
    tok = build_tokenizer()
    ids = torch.tensor([tok("a\nb\nc\nd", add_special_tokens=False)["input_ids"], [tok.pad_token_id] * 7])
    mask = torch.tensor([[True] * 7, [False] * 7])
    batch = RolloutBatch(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
        completion_ids=ids, completion_mask=mask, group_ids=torch.tensor([0, 1]), problems=["p", "q"],
        answers=["1", "2"],
    )
    assert mod.LineSegmenter(max_segments=2).segment(batch, tok) == [[(0, 2), (2, 7)], []]


def test_custom_prm_scores_distinct_token_fractions() -> None:
    mod = _load("custom_prm")
    out = mod.demo()
    assert torch.allclose(out.step_scores, torch.tensor([[1.0, 0.25], [1.0, 0.0]]))
    assert out.token_scores is None
    with pytest.raises(ValueError):
        mod.DistinctTokenPRM(min_tokens=0)


def test_custom_verifier_grades_each_row_against_its_own_gold() -> None:
    mod = _load("custom_verifier")
    verdicts = mod.demo()
    assert [v.status.value for v in verdicts] == ["correct", "correct", "unparsable"]
    assert [v.reward for v in verdicts] == [1.0, 1.0, 0.0]
    v = mod.LastIntegerVerifier(incorrect_reward=-1.0)
    assert v.verify("it is 8", "7").reward == -1.0
    bad_gold = v.verify("it is 8", "seven")
    assert bad_gold.error is not None and bad_gold.status.value == "unparsable"
    with pytest.raises(ValueError):
        v.verify_batch(["1"], [])


def test_custom_aligner_matches_hand_computation_and_is_permutation_invariant() -> None:
    mod = _load("custom_aligner")
    adv = mod.demo()
    o = 1 / 2**0.5  # outcome z-score of rewards (1, 0) with the unbiased std
    expected = torch.tensor(
        [[o + 0.5 * 0.45, o + 0.5 * 0.45, o + 0.5 * 0.05, o + 0.5 * 0.05], [-o - 0.5 * 0.25] * 3 + [0.0]]
    )
    assert torch.allclose(adv, expected, atol=1e-5)

    # rows in a different order (and a second group) give the same per-row advantages
    from prpo_lightning import RolloutBatch

    def batch(order: list[int]) -> RolloutBatch:
        spans = [[(0, 2), (2, 4)], [(0, 3)], [(0, 4)], [(0, 1), (1, 2)]]
        masks = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
        scores = [[0.9, 0.5], [0.2, 0.0], [0.4, 0.0], [0.7, 0.1]]
        smask = [[True, True], [True, False], [True, False], [True, True]]
        return RolloutBatch(
            prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.long),
            completion_ids=torch.zeros(4, 4, dtype=torch.long),
            completion_mask=torch.tensor([masks[i] for i in order], dtype=torch.bool),
            group_ids=torch.tensor([[3, 3, 8, 8][i] for i in order]), problems=["p"] * 4, answers=["1"] * 4,
            outcome_rewards=torch.tensor([[1.0, 0.0, 0.0, 1.0][i] for i in order]),
            segment_spans=[spans[i] for i in order],
            step_scores=torch.tensor([scores[i] for i in order]), step_mask=torch.tensor([smask[i] for i in order]),
        )

    aligner = mod.StepBonusAligner(bonus=0.5)
    base = aligner.align(batch([0, 1, 2, 3]))
    perm = [2, 0, 3, 1]
    assert torch.allclose(aligner.align(batch(perm)), base[perm], atol=1e-6)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_char_tokenizer(tmp_path_factory.mktemp("char_tok"))


@pytest.fixture(scope="module")
def trained(char_tokenizer: str):
    mod = _load("train_custom")
    torch.manual_seed(0)
    return mod.train(policy_config=tiny_qwen2_config(), tokenizer=char_tokenizer, max_steps=2,
                     enable_progress_bar=False, enable_model_summary=False)


def test_training_with_all_four_custom_components(trained) -> None:
    assert trained.global_step == 2
    m = trained.callback_metrics
    assert "train/segments/per_completion" in m and "train/prm/score_mean" in m  # the custom segmenter and PRM ran
    assert torch.isfinite(torch.tensor(float(m["train/loss"])))


def glossary_terms() -> set[str]:
    text = (ROOT / "docs" / "metrics.rst").read_text(encoding="utf-8")
    return set(re.findall(r"^   ((?:train|eval)/\S+)$", text, flags=re.M))


def test_every_logged_training_metric_is_in_the_glossary(trained) -> None:
    logged = {k for k in trained.callback_metrics if k.startswith("train/")}
    assert logged, "no training metrics were logged"
    missing = sorted(logged - glossary_terms())
    assert not missing, f"metrics logged by a training step but missing from docs/metrics.rst: {missing}"


def test_grpo_step_metrics_are_in_the_glossary(char_tokenizer: str) -> None:
    """Outcome-only aligners log the same names minus the process ones; all must be documented too."""
    import lightning as L

    from components.aligners import GRPOAligner
    from prpo_lightning.config import OptimConfig
    from prpo_lightning.data import ArithmeticDataModule
    from prpo_lightning.module import PRPOModule
    from prpo_lightning.config import SamplingConfig

    mod = _load("custom_verifier")
    module = PRPOModule(
        verifier=mod.LastIntegerVerifier(), aligner=GRPOAligner(), policy_config=tiny_qwen2_config(),
        tokenizer=char_tokenizer, sampling=SamplingConfig(num_generations=2, max_new_tokens=8),
        optim=OptimConfig(lr=1e-5), use_chat_template=False,
    )
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=ArithmeticDataModule(num_train=8, num_eval=2, batch_size=2))
    logged = {k for k in trainer.callback_metrics if k.startswith("train/")}
    missing = sorted(logged - glossary_terms())
    assert not missing, f"metrics missing from docs/metrics.rst: {missing}"


def test_custom_engine_trains_syncs_and_passes_the_self_check(tmp_path) -> None:
    """The how-to's RemoteEngine through two training steps: weights pushed at setup and after each update, the
    server's log-probs equal the trainer's (the self-check in ``raise`` mode passes)."""
    from prpo_lightning.config import LossConfig
    from prpo_lightning.config import MismatchCheck
    from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir

    mod = _load("custom_engine")
    tok = tokenizer_dir(tmp_path)
    probe = make_module(tok)  # the same seeded initial weights as the trained module's
    probe.configure_model()
    server = mod.InProcessServer(probe.policy, probe.tokenizer)
    module = make_module(tok, loss=LossConfig(kl_coef=0.0), engine=mod.RemoteEngine(server),
                         rollout_check=MismatchCheck(metric="logp_diff_max", threshold=1e-4, mode="raise"))
    assert module.plan.old_logprobs  # not the trainer's kernels: a separate log π_old pass
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, ToyPrompts(n=4, batch_size=2, seed=1))
    assert server.loads == 3  # setup (which loads the current weights: no second push at start) and one per update
    assert module.engine.weight_version == 2
    for name, value in module.policy.state_dict().items():
        assert torch.equal(server.model.state_dict()[name], value), name
    assert float(trainer.callback_metrics["train/rollout/logp_diff_max"]) < 1e-4
