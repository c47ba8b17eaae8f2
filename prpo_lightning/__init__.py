"""prpo-lightning: critic-free RL post-training of LLMs for math reasoning, built on PyTorch Lightning."""

from prpo_lightning.aligner import AdvantageAligner
from prpo_lightning.batch import RolloutBatch
from prpo_lightning.prm import ProcessRewardModel, ProcessScores
from prpo_lightning.segmenter import Segmenter
from prpo_lightning.verifier import OutcomeVerifier, Verdict, VerdictStatus

__all__ = [
    "AdvantageAligner",
    "OutcomeVerifier",
    "ProcessRewardModel",
    "ProcessScores",
    "RolloutBatch",
    "Segmenter",
    "Verdict",
    "VerdictStatus",
]
__version__ = "0.1.0"
