"""The module feeds SPRO the right log-probs: π_old = π_ref exactly at the first rollout (so SPRO = GRPO there), and
π_old is the updated policy, not the reference, afterwards (docs/replication.md, "SPRO and the implicit PRM")."""

from __future__ import annotations

import torch
from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir

from components.aligners import SPROAligner
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.config import LossConfig, OptimConfig


class RecordingSPRO(SPROAligner):
    """SPRO that keeps, per call, the log-ratio and the masked step advantage it saw."""

    def __init__(self) -> None:
        super().__init__(beta=0.05)
        self.seen: list[dict[str, torch.Tensor]] = []

    def advantage_terms(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        mask = batch.completion_mask
        self.seen.append({
            "log_ratio": torch.where(mask, batch.old_logprobs - batch.ref_logprobs, torch.zeros_like(batch.old_logprobs)),
            "msa": self.masked_step_advantage(batch),
        })
        return super().advantage_terms(batch)


def test_spro_log_ratio_is_zero_at_the_first_rollout_and_moves_after_an_update(tmp_path):
    aligner = RecordingSPRO()
    module = make_module(tokenizer_dir(tmp_path), aligner=aligner, loss=LossConfig(kl_coef=0.0),
                         optim=OptimConfig(lr=1e-2, micro_batch_size=4))
    assert module.plan.old_logprobs  # requires_reference forces the no-grad π_old pass
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, ToyPrompts(n=8, batch_size=2, seed=1))
    assert len(aligner.seen) == 2
    first, second = aligner.seen
    assert torch.equal(first["log_ratio"], torch.zeros_like(first["log_ratio"]))  # π_old = π_ref exactly
    assert torch.equal(first["msa"], torch.zeros_like(first["msa"]))  # so SPRO = GRPO at step 0
    assert float(second["log_ratio"].abs().max()) > 1e-4  # π_old is the updated policy, π_ref stays frozen
