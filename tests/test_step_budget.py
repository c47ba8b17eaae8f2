"""``trainer.max_steps`` counts optimizer steps everywhere: the run stops at it, the LR schedule decays over it, the
progress bar counts to it; resuming with a new ``lr`` or ``max_steps`` follows the new schedule from the resumed
step (issue 27, items 3 and 4). Before: with 2 PPO epochs × 2 mini-batches and ``max_steps: 2`` one batch made 4
optimizer steps, the last two at lr 0; a resume with a new lr kept the old one and trained its first step at lr 0."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir

from prpo_lightning.callbacks.progress import StepProgressBar
from prpo_lightning.config import OptimConfig
from prpo_lightning.training.updater import lr_factor


class OptimizerStepRates(L.Callback):
    """Records the learning rate of every optimizer step, as the optimizer reads it when it steps."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.bar_total: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.bar_total = StepProgressBar.total_steps(trainer)
        trainer.optimizers[0].register_step_pre_hook(
            lambda opt, args, kwargs: self.rates.append(float(opt.param_groups[0]["lr"])))


def _module(tok, lr=1e-2, warmup=0, total=None):
    # ToyPrompts: 2 prompts × G=4 = 8 rows per batch; mini-batches of 4, 2 epochs: 4 optimizer steps per batch
    return make_module(tok, optim=OptimConfig(lr=lr, warmup_steps=warmup, schedule="linear", total_steps=total,
                                              micro_batch_size=4, mini_batch_size=4, ppo_epochs=2))


@pytest.mark.slow
def test_max_steps_counts_optimizer_steps_and_never_trains_at_lr_0(tmp_path):
    tok = tokenizer_dir(tmp_path)
    rates = OptimizerStepRates()
    trainer = make_trainer(tmp_path / "a", 2, [rates])
    with pytest.warns(UserWarning, match=r"trainer\.max_steps=2 counts optimizer steps and each training batch makes "
                                         r"4 .*stops after 2 of them"):
        trainer.fit(_module(tok), ToyPrompts())
    assert trainer.global_step == 2 and rates.bar_total == 2
    assert rates.rates == pytest.approx([1e-2, 5e-3])  # linear over max_steps = 2: steps 0 and 1, both > 0
    adam = trainer.optimizers[0].state_dict()["state"]
    assert {float(s["step"]) for s in adam.values()} == {2.0}

    rates = OptimizerStepRates()
    trainer = make_trainer(tmp_path / "b", 8, [rates])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*counts optimizer steps")  # 8 is a multiple of 4: no warning
        trainer.fit(_module(tok), ToyPrompts())
    assert trainer.global_step == 8 and rates.bar_total == 8
    assert rates.rates == pytest.approx([1e-2 * (1 - k / 8) for k in range(8)])
    assert min(rates.rates) > 0


@pytest.mark.slow
def test_an_epoch_budget_counts_batches_times_their_optimizer_steps(tmp_path):
    tok = tokenizer_dir(tmp_path)
    rates = OptimizerStepRates()
    trainer = make_trainer(tmp_path, -1, [rates], max_epochs=1)
    trainer.fit(_module(tok), ToyPrompts(n=4))  # 2 batches × 4 optimizer steps
    assert trainer.global_step == 8 and rates.bar_total == 8
    assert rates.rates == pytest.approx([1e-2 * (1 - k / 8) for k in range(8)])


def test_a_schedule_shorter_than_max_steps_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, 8)
    with pytest.raises(ValueError, match=r"model\.optim\.total_steps=4 is shorter than the run's 8 optimizer steps .*"
                                         r"steps 4 to 7 would train at lr 0.*set it >= 8"):
        trainer.fit(_module(tokenizer_dir(tmp_path), total=4), ToyPrompts())


@pytest.mark.slow
def test_resume_with_a_new_lr_and_more_steps_follows_the_new_schedule_from_the_resumed_step(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    tok = tokenizer_dir(tmp_path)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = OptimizerStepRates()
    make_trainer(tmp_path, 4, [first, ckpt], enable_checkpointing=True).fit(_module(tok, warmup=1), ToyPrompts())
    assert first.rates == pytest.approx([1e-2 * lr_factor(k, 1, 4, "linear") for k in range(4)])

    second = OptimizerStepRates()
    trainer = make_trainer(tmp_path, 8, [second])
    with pytest.warns(UserWarning) as caught:
        trainer.fit(_module(tok, lr=2e-2, warmup=1), ToyPrompts(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    resumed = [str(w.message) for w in caught if "resumed at optimizer step" in str(w.message)]
    assert len(resumed) == 1, resumed  # logged once
    assert "resumed at optimizer step 4" in resumed[0] and "lr 0.01 -> 0.02" in resumed[0] \
        and "total 4 -> 8" in resumed[0]
    assert trainer.global_step == 8
    # the new schedule (peak 2e-2, linear over 8 steps, warm-up 1) at steps 4..7; before, step 4 trained at lr 0
    assert second.rates == pytest.approx([2e-2 * lr_factor(k, 1, 8, "linear") for k in range(4, 8)])
    assert min(second.rates) > 0
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == 2e-2
