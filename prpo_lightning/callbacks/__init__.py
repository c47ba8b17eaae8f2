"""Lightning callbacks: held-out math evaluation, training curves, a step-counting progress bar, batch checks and
preemption checkpoints, and the lifecycle of asynchronous rollouts."""

from prpo_lightning.callbacks.async_rollouts import AsyncRolloutsHooks
from prpo_lightning.callbacks.batch_checks import BatchChecks

from prpo_lightning.callbacks.curves import TrainingCurves
from prpo_lightning.callbacks.evaluation import MathEvalCallback
from prpo_lightning.callbacks.preemption import PreemptionCheckpoint
from prpo_lightning.callbacks.progress import StepProgressBar

__all__ = ["AsyncRolloutsHooks", "BatchChecks", "MathEvalCallback", "PreemptionCheckpoint", "StepProgressBar", "TrainingCurves"]
