"""How-to: train with your own components (included in the docs, executed by tests/test_docs_howto.py)."""

from __future__ import annotations

from typing import Any

# [train]
import lightning as L

from prpo_lightning.config import LossConfig, OptimConfig
from prpo_lightning.data import ArithmeticDataModule
from prpo_lightning.module import PRPOModule
from prpo_lightning.config import SamplingConfig

from custom_aligner import StepBonusAligner  # the classes of the other guides (any importable module works)
from custom_prm import DistinctTokenPRM
from custom_segmenter import LineSegmenter
from custom_verifier import LastIntegerVerifier


def train(policy: str | None = None, policy_config: dict | None = None, tokenizer: str | None = None,
          max_steps: int = 2, **trainer_kwargs: Any) -> L.Trainer:
    """Fit ``max_steps`` optimizer steps on the offline arithmetic task with the four custom components."""
    module = PRPOModule(
        verifier=LastIntegerVerifier(),
        aligner=StepBonusAligner(bonus=0.5),
        segmenter=LineSegmenter(),
        prm=DistinctTokenPRM(),
        policy=policy,
        policy_config=policy_config,
        tokenizer=tokenizer,
        sampling=SamplingConfig(num_generations=4, max_new_tokens=24, max_prompt_length=256),
        loss=LossConfig(aggregation="token-mean"),
        optim=OptimConfig(lr=1e-5, micro_batch_size=8),
        use_chat_template=False,
    )
    data = ArithmeticDataModule(num_train=64, num_eval=8, batch_size=2)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer
# [train-end]


if __name__ == "__main__":
    trainer = train(policy="prpo-demo/arith-qwen2-tiny")  # the builtin demo policy (ships with the package)
    print({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
