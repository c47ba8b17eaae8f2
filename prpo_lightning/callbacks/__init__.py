"""Lightning callbacks: held-out math evaluation and training curves."""

from prpo_lightning.callbacks.curves import TrainingCurves
from prpo_lightning.callbacks.evaluation import MathEvalCallback

__all__ = ["MathEvalCallback", "TrainingCurves"]
