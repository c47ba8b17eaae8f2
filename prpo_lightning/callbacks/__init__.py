"""Lightning callbacks: held-out math evaluation, training curves and a step-counting progress bar."""

from prpo_lightning.callbacks.curves import TrainingCurves
from prpo_lightning.callbacks.evaluation import MathEvalCallback
from prpo_lightning.callbacks.progress import StepProgressBar

__all__ = ["MathEvalCallback", "StepProgressBar", "TrainingCurves"]
