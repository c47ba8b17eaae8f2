"""Lightning callbacks: held-out math evaluation, training curves, a step-counting progress bar, batch checks and
preemption checkpoints."""

from prpo_lightning.callbacks.batch_checks import BatchChecks

from prpo_lightning.callbacks.curves import TrainingCurves
from prpo_lightning.callbacks.evaluation import MathEvalCallback
from prpo_lightning.callbacks.preemption import PreemptionCheckpoint
from prpo_lightning.callbacks.progress import StepProgressBar

__all__ = ["BatchChecks", "MathEvalCallback", "PreemptionCheckpoint", "StepProgressBar", "TrainingCurves"]
