"""Bad input and faults: clear errors or counted skips, and never NaN/inf advantages or loss.

Policy (docs/scaling.md, "Faults"):

- data rows with a missing/empty ``problem``/``answer`` or broken JSON: ``DataFileError`` naming file:line;
- prompts longer than ``sampling.max_prompt_length``: skipped, counted in ``train/data/skipped_long_prompts``;
- empty (length-0) and truncated completions: graded like any other, counted (``completion/truncated_frac``),
  optionally left out of the loss (``loss.mask_truncated_completions``);
- verifier timeout: an UNPARSABLE verdict counted in ``verifier/timeouts``; a verifier *exception*:
  ``VerifierError`` naming the verifier;
- PRM exception or timeout: ``PRMError`` naming the PRM, or with ``on_prm_error: skip`` the batch's update is
  skipped and counted in ``train/faults/prm_errors`` (the batch still counts as a step; tests/test_skips.py covers
  the ``max_consecutive_skips`` budget and programming errors, which are never skipped).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_resume import GroupNormAligner, ParityVerifier, ToyPrompts, make_module, make_trainer, tokenizer_dir

from prpo_lightning.batch import RolloutBatch
from prpo_lightning.config import LossConfig
from prpo_lightning.data import DataFileError, read_jsonl
from prpo_lightning.scoring.faults import PRMError, VerifierError
from prpo_lightning.scoring.prm import ProcessRewardModel
from prpo_lightning.scoring.pipeline import compute_advantages, grade
from prpo_lightning.scoring.segmenter import Segmenter
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus


# ---------------------------------------------------------------- data rows
@pytest.mark.parametrize(
    "line, message",
    [
        ('{"answer": "1"}', "missing field 'problem'"),
        ('{"problem": "1+1", "answer": "  "}', "empty field 'answer'"),
        ('{"problem": "1+1"', "broken JSON"),
        ('[1, 2]', "expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"problem": "2+2", "answer": "4"}\n' + line + "\n")
    with pytest.raises(DataFileError, match=rf"d\.jsonl:2: {message}"):
        read_jsonl(path)


# ---------------------------------------------------------------- long prompts
def test_long_prompts_are_skipped_and_counted(tmp_path):
    module = make_module(tokenizer_dir(tmp_path))
    module.configure_model()
    batch = {"id": torch.tensor([0, 1, 2]), "problem": ["1+1=", "9" * 40, "2+2="], "answer": ["2", "x", "4"]}
    rollout, metrics = module.collector.make_rollout(batch, module.step_context())
    assert metrics["data/skipped_long_prompts"] == 1.0
    assert rollout.size == 2 * 4 and set(rollout.group_ids.tolist()) == {0, 2}
    none, metrics = module.collector.make_rollout({"id": torch.tensor([5]), "problem": ["9" * 40], "answer": ["x"]}, module.step_context())
    assert none is None and metrics["data/skipped_long_prompts"] == 1.0


# ---------------------------------------------------------------- degenerate batches
class _ByText(OutcomeVerifier):
    """Correct iff the completion text is 'ok'; 'timeout' gives a timed-out UNPARSABLE verdict."""

    def verify(self, completion: str, gold: str) -> Verdict:
        if completion == "timeout":
            return Verdict(VerdictStatus.UNPARSABLE, 0.0, timed_out=True)
        ok = completion == "ok"
        return Verdict(VerdictStatus.CORRECT if ok else VerdictStatus.INCORRECT, float(ok))


def _batch(texts: list[str], groups: list[int], lengths: list[int], truncated: list[bool], t: int = 6) -> RolloutBatch:
    b = len(texts)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    gen = torch.Generator().manual_seed(0)
    return RolloutBatch(
        prompt_ids=torch.full((b, 3), 5), prompt_mask=torch.ones(b, 3, dtype=torch.long),
        completion_ids=torch.where(mask, torch.randint(3, 60, (b, t), generator=gen), 0), completion_mask=mask,
        group_ids=torch.tensor(groups), problems=["p"] * b, answers=["a"] * b, completions=texts,
        truncated=torch.tensor(truncated), old_logprobs=torch.zeros(b, t) - 4.0, ref_logprobs=torch.zeros(b, t) - 4.0,
    )


DEGENERATE = {
    "all_correct": _batch(["ok"] * 4, [0] * 4, [3, 4, 5, 6], [False] * 4),
    "all_wrong": _batch(["no"] * 4, [0] * 4, [3, 4, 5, 6], [False] * 4),
    "singletons": _batch(["ok", "no", "ok"], [0, 1, 2], [2, 3, 4], [False] * 3),
    "zero_length": _batch(["", "", "ok", "no"], [0, 0, 1, 1], [0, 0, 3, 2], [False] * 4),
    "all_zero_length": _batch(["", ""], [0, 0], [0, 0], [False, False]),
    "all_truncated": _batch(["ok", "no", "no", "ok"], [0, 0, 1, 1], [6, 6, 6, 6], [True] * 4),
    "timeouts": _batch(["timeout", "ok", "timeout", "no"], [0, 0, 0, 0], [2, 3, 4, 5], [False] * 4),
}


def _aligners():
    out = [GroupNormAligner()]
    try:  # the bundled outcome aligners, when present
        from components.aligners import DrGRPOAligner, GRPOAligner, RLOOAligner

        out += [GRPOAligner(), DrGRPOAligner(), RLOOAligner()]
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_batches_give_finite_advantages_and_loss(tmp_path_factory, case, mask_truncated):
    module = make_module(
        tokenizer_dir(tmp_path_factory.getbasetemp()), loss=LossConfig(kl_coef=0.01, mask_truncated_completions=mask_truncated)
    )
    module.configure_model()
    module.updater.backward = lambda loss: loss.backward()  # no trainer needed for the loss path
    for aligner in _aligners():
        batch = DEGENERATE[case].select(torch.arange(DEGENERATE[case].size))  # fresh copy
        metrics = compute_advantages(batch, _ByText(), aligner, None, None, module.tokenizer)
        assert torch.isfinite(batch.advantages).all(), (case, type(aligner).__name__)
        assert (batch.advantages[~batch.completion_mask] == 0).all()
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        module.policy.zero_grad()
        stats = module.updater.accumulate(batch, torch.arange(batch.size), module.device)
        assert all(math.isfinite(v) for v in stats.values()), (case, stats)
        assert all(torch.isfinite(p.grad).all() for p in module.policy.parameters() if p.grad is not None)
        if case in ("all_correct", "all_wrong"):
            assert batch.advantages.abs().max() == 0  # no outcome signal in a constant group
        if case == "all_truncated":
            assert metrics["completion/truncated_frac"] == 1.0
            if mask_truncated:  # nothing enters the loss
                assert stats["loss"] == 0.0 and stats["pg_loss"] == 0.0
        if case == "timeouts":
            assert metrics["verifier/timeouts"] == 2.0 and metrics["verifier/unparsable"] == 2.0


def test_verifier_timeout_is_unparsable_and_counted():
    batch = DEGENERATE["timeouts"].select(torch.arange(4))
    metrics = grade(batch, _ByText())
    assert metrics["verifier/timeouts"] == 2.0
    assert [v.status for v in batch.verdicts][0] is VerdictStatus.UNPARSABLE


# ---------------------------------------------------------------- component exceptions during fit
class _OneSegment(Segmenter):
    def segment(self, batch, tokenizer):
        return [[(0, int(n))] if n else [] for n in batch.lengths.tolist()]


class _BrokenPRM(ProcessRewardModel):
    def score(self, batch, tokenizer):
        raise TimeoutError("PRM server did not answer in 30 s")


class _ProcessAligner(GroupNormAligner):
    uses_process_scores = True


class _BrokenVerifier(OutcomeVerifier):
    def verify(self, completion, gold):
        raise KeyError("boom")


def _prm_module(tok, on_prm_error):
    return make_module(tok, segmenter=_OneSegment(), prm=_BrokenPRM(), aligner=_ProcessAligner(), on_prm_error=on_prm_error)


def test_prm_exception_raises_clear_error(tmp_path):
    module = _prm_module(tokenizer_dir(tmp_path), "raise")
    with pytest.raises(PRMError, match=r"PRM _BrokenPRM failed .*TimeoutError: PRM server did not answer"):
        make_trainer(tmp_path, 1).fit(module, ToyPrompts())


@pytest.mark.slow
def test_prm_exception_skip_is_counted_and_does_not_update(tmp_path):
    tok = tokenizer_dir(tmp_path)
    module = _prm_module(tok, "skip")
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = make_trainer(tmp_path, 1, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, ToyPrompts())
    assert trainer.callback_metrics["train/faults/prm_errors"] == 1.0
    assert trainer.global_step == 1  # the skipped batch counts as a step (max_steps=1 ends the run) ...
    assert trainer.optimizers[0].state_dict()["state"] == {}  # ... but no optimizer step was taken
    for k, v in module.policy.state_dict().items():
        assert torch.equal(v, before[k])


def test_verifier_exception_raises_clear_error(tmp_path):
    module = make_module(tokenizer_dir(tmp_path), verifier=_BrokenVerifier())
    with pytest.raises(VerifierError, match=r"verifier _BrokenVerifier failed .*KeyError"):
        make_trainer(tmp_path, 1).fit(module, ToyPrompts())


def test_bad_on_prm_error_value(tmp_path):
    with pytest.raises(ValueError, match="on_prm_error"):
        make_module(tokenizer_dir(tmp_path), on_prm_error="ignore")


def test_parity_verifier_sanity():
    assert ParityVerifier().verify("ab", "").is_correct and not ParityVerifier().verify("a", "").is_correct
