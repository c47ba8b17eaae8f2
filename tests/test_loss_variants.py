"""The loss variants of issue 14 against hand-computed values, overlong reward shaping, config validation, and a
2-step ``prpo-fit fit`` through the CLI with every option on (PRPO and GRPO).

TRL equality of the same options is in ``tests/test_trl_equality.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import build_char_tokenizer, tiny_qwen2_config
import prpo_lightning.training.updater as update
from prpo_lightning.cli import cli_main
from prpo_lightning.config import LossConfig
from prpo_lightning.training.logprobs import completion_logprobs
from prpo_lightning.training.losses import cispo_loss, importance_ratio, top_entropy_mask
from prpo_lightning.module import PRPOModule
from prpo_lightning.config import OverlongConfig, RewardShapingConfig
from prpo_lightning.scoring.shaping import apply_reward_shaping, overlong_penalty

CFG = dict(eps_low=0.2, eps_high=0.2, dual_clip=None)


# ------------------------------------------------------------------ importance_sampling_level: sequence (GSPO)
def test_sequence_ratio_is_the_exp_of_the_mean_log_ratio_over_the_sequence_tokens():
    old = torch.log(torch.tensor([[0.5, 0.25, 0.5]]))  # (1, 3)
    logp = (old + torch.tensor([[0.1, -0.3, 5.0]])).requires_grad_()  # last token is padding
    mask = torch.tensor([[True, True, False]])  # (1, 3)
    ratio = importance_ratio(logp, old, mask, "sequence")  # (1, 3)
    s = math.exp((0.1 - 0.3) / 2)  # 0.904837: the padding token's 5.0 does not count
    assert ratio.tolist()[0] == pytest.approx([s, s, s], abs=1e-6)
    assert importance_ratio(logp, old, mask, "token").tolist()[0] == pytest.approx(
        [math.exp(0.1), math.exp(-0.3), math.exp(5.0)], rel=1e-6)
    ratio[0, :2].sum().backward()  # d/dlogp_t of 2s = 2 · s · m_t / |y|
    assert logp.grad.tolist()[0] == pytest.approx([s, s, 0.0], abs=1e-6)
    empty = importance_ratio(logp.detach(), old, torch.zeros(1, 3, dtype=torch.bool), "sequence")
    assert empty.tolist() == [[1.0, 1.0, 1.0]]  # no tokens: s = exp(0)


def test_sequence_level_ppo_clip_by_hand():
    cfg = LossConfig(importance_sampling_level="sequence", **CFG)
    old = torch.zeros(2, 2)  # (2, 2)
    logp = torch.tensor([[0.1, -0.3], [-0.4, -0.6]])  # row means −0.1 (inside) and −0.5 (ratio 0.6065 < 0.8)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # (2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    pg, clipped = update.policy_gradient_terms(logp, old, adv, None, cfg, seq_mask=mask)
    # row 0: −A·s = −0.904837 per token; row 1: −min(−0.6065, −0.8) = 0.8 per token (clipped)
    assert pg.tolist()[0] == pytest.approx([-math.exp(-0.1)] * 2, abs=1e-6)
    assert pg.tolist()[1] == pytest.approx([0.8, 0.8], abs=1e-6)
    assert clipped.tolist() == [[False, False], [True, True]]


# ------------------------------------------------------------------ policy_loss: cispo
def test_cispo_by_hand_weight_capped_and_detached():
    old = torch.log(torch.tensor([[0.5, 0.1]]))  # (1, 2)
    logp = torch.log(torch.tensor([[0.55, 0.8]])).requires_grad_()  # ratios 1.1 and 8 (capped at 5)
    adv = torch.tensor([[2.0, -1.0]])
    cfg = LossConfig(policy_loss="cispo", cispo_max_ratio=5.0)
    pg, clipped = update.policy_gradient_terms(logp, old, adv, None, cfg)
    # ℓ = −min(ρ, 5)·A·log π: token 0: −1.1·2·ln 0.55; token 1: −5·(−1)·ln 0.8
    assert pg.tolist()[0] == pytest.approx([-1.1 * 2 * math.log(0.55), 5 * math.log(0.8)], rel=1e-5)
    assert clipped.tolist() == [[False, True]]
    pg.sum().backward()  # the weight is detached: ∂ℓ/∂log π = −min(ρ, 5)·A
    assert logp.grad.tolist()[0] == pytest.approx([-2.2, 5.0], rel=1e-5)
    direct, _ = cispo_loss(logp.detach(), torch.tensor([[1.1, 8.0]]), adv, 5.0)
    assert direct.tolist()[0] == pytest.approx(pg.detach().tolist()[0], rel=1e-6)


# ------------------------------------------------------------------ kl_bias_correction
def test_kl_bias_correction_weights_k3_by_the_ratio_by_hand():
    old = torch.tensor([[0.0, 0.0]])  # (1, 2)
    logp = torch.tensor([[0.0, 0.2]], requires_grad=True)  # ratios 1 and e^0.2
    ref = torch.tensor([[-0.5, 0.0]])  # d = logp − ref = 0.5, 0.2
    corrected = update.kl_term(logp, old, ref, LossConfig(kl_coef=0.1, kl_bias_correction=True))
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(-0.2) + 0.2 - 1]  # 0.106531, 0.018731
    assert corrected.tolist()[0] == pytest.approx([k3[0], k3[1] * math.exp(0.2)], rel=1e-5)
    corrected[0, 0].backward()  # ρ = 1 in value: ∂(k3·ρ)/∂logp = (1 − e^−d) + k3 = d
    assert logp.grad[0, 0].item() == pytest.approx(0.5, rel=1e-5)
    logp.grad = None
    plain = update.kl_term(logp, old, ref, LossConfig(kl_coef=0.1, kl_bias_correction=False))
    plain[0, 0].backward()  # uncorrected: 1 − e^−0.5
    assert logp.grad[0, 0].item() == pytest.approx(1 - math.exp(-0.5), rel=1e-5)


# ------------------------------------------------------------------ top_entropy_quantile
def test_top_entropy_mask_by_hand():
    ent = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])  # (2, 3); the 5.0 is padding
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # sorted masked entropies 0.1 0.3 0.5 0.7 0.9; quantile 1 − 0.4 = 0.6 → position 2.4 → 0.5 + 0.4·0.2 = 0.58
    assert top_entropy_mask(ent, mask, 0.4).tolist() == [[False, False, True], [False, True, False]]
    assert top_entropy_mask(ent, mask, 1.0).tolist() == mask.tolist()  # threshold = min: all loss tokens
    assert top_entropy_mask(ent, mask, 0.0).tolist() == [[False, False, True], [False, False, False]]  # the max only
    tie = torch.tensor([[0.5, 0.5, 0.2]])  # ties at the threshold are kept (≥)
    assert top_entropy_mask(tie, torch.ones(1, 3, dtype=torch.bool), 0.0).tolist() == [[True, True, False]]
    assert not top_entropy_mask(ent, torch.zeros(2, 3, dtype=torch.bool), 0.5).any()


def test_dropped_tokens_get_zero_policy_loss():
    keep = torch.tensor([[True, False]])
    pg, clipped = update.policy_gradient_terms(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, -3.0]]),
                                               None, LossConfig(**CFG), keep=keep)
    assert pg.tolist() == [[-1.0, 0.0]] and clipped.tolist() == [[False, False]]


# ------------------------------------------------------------------ entropy_coef
class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are one trainable tensor ``(1, P + T, V)``."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        return type("Out", (), {"logits": self.logits[:, -logits_to_keep:]})()


def test_differentiable_entropy_by_hand():
    # completion token t is predicted at sequence position P + t − 1; token 0: logits (0, ln 3) → p = (1/4, 3/4), H = −(¼ln¼ + ¾ln¾) = 0.562335
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [0.0, 0.0]]])  # (1, P + T = 3, V = 2)
    model = FixedLogits(logits)
    ids, mask = torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long)  # prompt length 1
    comp = torch.tensor([[1, 0]])  # (1, T = 2)
    logp, ent = completion_logprobs(model, ids, mask, comp, torch.ones(1, 2), with_entropy=True, entropy_grad=True)
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert ent.tolist()[0] == pytest.approx([h0, math.log(2.0)], abs=1e-6)
    _, ent_nograd = completion_logprobs(model, ids, mask, comp, torch.ones(1, 2), with_entropy=True)
    assert ent_nograd.tolist()[0] == pytest.approx(ent.detach().tolist()[0], abs=1e-6)
    ent[0, 0].backward()  # dH/dz_1 = −p(1−p)(z_1 − z_0) = −(3/16)·ln 3
    assert model.logits.grad[0, 0].tolist() == pytest.approx([3 / 16 * math.log(3.0), -3 / 16 * math.log(3.0)],
                                                             abs=1e-6)


def test_entropy_bonus_in_the_module_update(tmp_path):
    from prpo_lightning.batch import RolloutBatch
    from prpo_lightning.config import OptimConfig
    from test_resume import make_module, tokenizer_dir

    batch = RolloutBatch(
        prompt_ids=torch.tensor([[5, 6], [5, 6]]), prompt_mask=torch.ones(2, 2, dtype=torch.long),
        completion_ids=torch.tensor([[7, 8, 9], [7, 9, 0]]), completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        group_ids=torch.tensor([0, 0]), problems=["p", "p"], answers=["a", "a"],
        truncated=torch.zeros(2, dtype=torch.bool), advantages=torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]),
    )
    tok = tokenizer_dir(tmp_path)
    stats = {}
    for coef in (0.0, 0.5):
        module = make_module(tok, loss=LossConfig(kl_coef=0.0, entropy_coef=coef), optim=OptimConfig(micro_batch_size=1))
        module.configure_model()
        module.updater.backward = lambda loss: loss.backward()
        stats[coef] = module.updater.accumulate(batch, torch.arange(2), module.device)
    on = stats[0.5]
    # on-policy: pg = −Σ A / 5 = −0.2; bonus = Σ H / 5 tokens (the logged mean entropy), over two micro-batches
    assert on["pg_loss"] == pytest.approx(-0.2, abs=1e-6)
    assert on["entropy_bonus"] == pytest.approx(on["entropy"], rel=1e-6) and on["entropy"] > 0
    assert on["loss"] == pytest.approx(-0.2 - 0.5 * on["entropy"], rel=1e-6)
    assert stats[0.0]["loss"] == pytest.approx(-0.2, abs=1e-6) and "entropy_bonus" not in stats[0.0]


# ------------------------------------------------------------------ overlong reward shaping
def test_overlong_penalty_by_hand():
    cfg = OverlongConfig(buffer_length=4, penalty=0.5)  # L_max = 10: ramp from 6 tokens (0) to 10 tokens (−0.5)
    lengths = torch.tensor([0, 6, 7, 9, 10, 12])
    assert overlong_penalty(lengths, 10, cfg).tolist() == pytest.approx([0, 0, -0.125, -0.375, -0.5, -0.5])
    # TRL's docstring example: L_max 100, cache 20, 90 tokens → −0.5 (penalty 1)
    assert overlong_penalty(torch.tensor([90]), 100, OverlongConfig(buffer_length=20)).tolist() == [-0.5]
    with pytest.raises(ValueError, match="buffer_length .* must be at most model.sampling.max_new_tokens"):
        overlong_penalty(lengths, 3, cfg)


def test_overlong_matches_trl_soft_overlong_punishment():
    trl_rewards = pytest.importorskip("trl.rewards")
    punish = trl_rewards.get_soft_overlong_punishment(max_completion_len=16, soft_punish_cache=5)
    lengths = list(range(0, 17))
    ours = overlong_penalty(torch.tensor(lengths), 16, OverlongConfig(buffer_length=5, penalty=1.0))
    assert ours.tolist() == pytest.approx(punish([[1] * n for n in lengths]), abs=1e-7)


def test_apply_reward_shaping_adds_the_penalty_and_logs_it():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    shaped, metrics = apply_reward_shaping(rewards, torch.tensor([2, 8, 7, 3]), 8,
                                           RewardShapingConfig(overlong=OverlongConfig(buffer_length=2)))
    assert shaped.tolist() == pytest.approx([1.0, -1.0, 0.5, 0.0])
    assert metrics == pytest.approx({"reward/overlong_penalty": -0.375, "reward/overlong_frac": 0.5})
    same, none = apply_reward_shaping(rewards, torch.tensor([8, 8, 8, 8]), 8, RewardShapingConfig())
    assert same is rewards and none == {}


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kw, key", [
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(policy_loss="gspo"), "policy_loss"),
    (dict(cispo_max_ratio=0.0), "cispo_max_ratio"),
    (dict(entropy_coef=-0.1), "entropy_coef"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
])
def test_loss_options_are_validated(kw, key):
    with pytest.raises(ValueError, match=f"model.loss.{key} must be"):
        LossConfig(**kw)


def test_overlong_config_is_validated():
    with pytest.raises(ValueError, match="buffer_length must be an integer >= 1"):
        OverlongConfig(buffer_length=0)
    with pytest.raises(ValueError, match="penalty must be >= 0"):
        OverlongConfig(buffer_length=2, penalty=-1.0)


# ------------------------------------------------------------------ 2-step prpo-fit fit with every option on
@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "prpo"])
def test_fit_two_steps_with_every_loss_option(tmp_path, monkeypatch, method):
    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    tok = build_char_tokenizer(tmp_path / "tok")
    aligner = {"grpo": "components.aligners.GRPOAligner", "prpo": "components.aligners.PRPOAligner"}[method]
    args = [
        "fit", "--seed_everything=0", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=2",
        "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.policy=null", f"--model.policy_config={json.dumps(tiny_qwen2_config(vocab_size=128))}",
        f"--model.tokenizer={tok}", "--model.dtype=float32",
        "--model.verifier=components.verifiers.SympyMathVerifier", f"--model.aligner={aligner}",
        "--model.sampling.num_generations=4", "--model.sampling.max_new_tokens=16",
        "--model.optim.lr=1e-4", "--model.optim.micro_batch_size=4", "--model.optim.ppo_epochs=2",
        "--model.loss.kl_coef=0.01", "--model.loss.importance_sampling_level=sequence",
        "--model.loss.policy_loss=cispo", "--model.loss.cispo_max_ratio=2.0", "--model.loss.kl_bias_correction=true",
        "--model.loss.entropy_coef=0.01", "--model.loss.top_entropy_quantile=0.5",
        "--model.reward_shaping.overlong.buffer_length=8", "--model.reward_shaping.overlong.penalty=0.5",
        "--model.prompt_template=Q: {problem}\nA:\n",
        "--data=prpo_lightning.data.ArithmeticDataModule", "--data.num_train=16", "--data.num_eval=4",
        "--data.batch_size=2",
    ]
    if method == "prpo":
        args += ["--model.segmenter=components.segmenters.EntropySpikeSegmenter", "--model.segmenter.min_gap=4",
                 "--model.prm=components.prms.EquationCheckPRM"]
    cli = cli_main(args)
    assert isinstance(cli.model, PRPOModule) and cli.trainer.global_step == 2
    lcfg = cli.model.loss_cfg
    assert (lcfg.importance_sampling_level, lcfg.policy_loss, lcfg.kl_bias_correction) == ("sequence", "cispo", True)
    assert cli.model.reward_shaping.overlong == OverlongConfig(buffer_length=8, penalty=0.5)
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/kl", "train/entropy_bonus", "train/top_entropy_frac",
                "train/reward/overlong_penalty", "train/reward/overlong_frac", "train/grad_norm"):
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    assert float(metrics["train/reward/overlong_penalty"]) <= 0.0
    assert 0.0 < float(metrics["train/top_entropy_frac"]) <= 1.0
