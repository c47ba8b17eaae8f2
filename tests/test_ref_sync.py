"""Reference-model sync (``model.ref_sync``, TRL's ``sync_ref_model``): the mix formula and when it fires against
hand-computed values, through real training steps, and exact resume (the synced reference is checkpointed)."""

from __future__ import annotations

import pytest
import torch
from test_resume import ToyPrompts, make_module, make_trainer, tokenizer_dir

from prpo_lightning.config import LossConfig, OptimConfig
from prpo_lightning.config import RefSyncConfig
from prpo_lightning.training.refsync import ReferenceSync, mix_into_reference


def test_mix_formula_hand_values():
    policy, reference = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[1.0, 3.0]]))
        reference.weight.copy_(torch.tensor([[5.0, -1.0]]))
    mix_into_reference(policy, reference, 0.25)  # 0.25·θ + 0.75·θ_ref
    assert reference.weight.tolist() == [[0.25 * 1 + 0.75 * 5, 0.25 * 3 + 0.75 * -1]]  # [[4.0, 0.0]]
    mix_into_reference(policy, reference, 1.0)
    assert torch.equal(reference.weight, policy.weight)


def test_fires_every_k_optimizer_steps_like_trl():
    policy, reference = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(2.0)
        reference.weight.fill_(0.0)
    sync = ReferenceSync(RefSyncConfig(sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=3))
    fired = [sync.after_optimizer_step(policy, reference) for _ in range(7)]
    assert fired == [False, False, True, False, False, True, False]  # TRL: global_step % k == 0
    assert reference.weight.item() == 1.5  # 0 → 1.0 (step 3) → 1.5 (step 6)
    off = ReferenceSync(RefSyncConfig(ref_model_sync_steps=1))
    assert not any(off.after_optimizer_step(policy, reference) for _ in range(3)) and off.optimizer_steps == 3


def test_checkpointed_reference_waits_for_a_late_reference():
    """Under ZeRO-3 the reference is built at fit start, after on_load_checkpoint: the state waits for it."""
    saved_ref = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        saved_ref.weight.fill_(0.75)
    sync = ReferenceSync(RefSyncConfig(sync_ref_model=True, ref_model_sync_steps=2))
    state = sync.state_dict(saved_ref)
    restored = ReferenceSync(RefSyncConfig(sync_ref_model=True, ref_model_sync_steps=2))
    restored.load_state_dict({**state, "optimizer_steps": 5}, None)
    late = torch.nn.Linear(1, 1, bias=False)
    restored.apply_pending(late)
    assert restored.optimizer_steps == 5 and late.weight.item() == 0.75
    with pytest.raises(ValueError, match="does not match this policy"):
        restored.load_state_dict(state, torch.nn.Linear(1, 1, bias=True))


def test_settings_are_validated_naming_the_key():
    with pytest.raises(ValueError, match="model.ref_sync.ref_model_mixup_alpha must be in"):
        RefSyncConfig(ref_model_mixup_alpha=1.5)
    with pytest.raises(ValueError, match="model.ref_sync.ref_model_sync_steps must be an integer >= 1"):
        RefSyncConfig(ref_model_sync_steps=0)


def test_sync_without_a_reference_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync_ref_model needs a reference model"):
        make_module(tokenizer_dir(tmp_path), loss=LossConfig(kl_coef=0.0), ref_sync=RefSyncConfig(sync_ref_model=True))


def _sync_module(tok, **kw):
    # 2 mini-batches per step: 2 optimizer steps per training step, so syncs fall mid-step too
    optim = OptimConfig(lr=1e-2, warmup_steps=1, schedule="linear", total_steps=8, micro_batch_size=4,
                        mini_batch_size=4)
    ref_sync = RefSyncConfig(sync_ref_model=True, ref_model_mixup_alpha=0.3, ref_model_sync_steps=3)
    return make_module(tok, optim=optim, ref_sync=ref_sync, **kw)


class PolicySnapshots:
    """Wraps ``after_optimizer_step`` to save the policy's weights after every optimizer step."""

    def __init__(self, module) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        original = module.after_optimizer_step

        def record() -> None:
            self.weights.append({k: v.detach().clone() for k, v in module.policy.named_parameters()})
            original()

        module.after_optimizer_step = record


@pytest.mark.slow
def test_reference_equals_the_formula_on_saved_weights(tmp_path):
    tok = tokenizer_dir(tmp_path)
    module = _sync_module(tok)
    module.configure_model()
    expected = {k: v.detach().clone() for k, v in module.policy.named_parameters()}  # θ_ref starts as θ_0
    snapshots = PolicySnapshots(module)
    make_trainer(tmp_path, 6).fit(module, ToyPrompts())  # max_steps counts optimizer steps
    assert len(snapshots.weights) == 6  # 3 training steps × 2 mini-batches; syncs after optimizer steps 3 and 6
    for step, theta in enumerate(snapshots.weights, start=1):
        if step % 3 == 0:
            expected = {k: 0.7 * expected[k] + 0.3 * theta[k] for k in expected}
    reference = dict(module._reference.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(reference[name], value, atol=1e-6, rtol=1e-6)
    assert any(not torch.equal(reference[k], snapshots.weights[-1][k]) for k in reference)


@pytest.mark.slow
def test_resume_restores_the_synced_reference_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    tok = tokenizer_dir(tmp_path)
    straight = _sync_module(tok)
    make_trainer(tmp_path / "a", 8).fit(straight, ToyPrompts())  # 4 training steps, 8 optimizer steps

    first = _sync_module(tok)
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path / "b"), every_n_train_steps=1, save_last=True, save_top_k=-1)
    make_trainer(tmp_path / "b", 4, [ckpt_cb], enable_checkpointing=True).fit(first, ToyPrompts())
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)["prpo_ref_sync"]
    assert saved["optimizer_steps"] == 4 and "reference" in saved  # one sync done (step 3), saved with the count
    assert not torch.equal(saved["reference"]["lm_head.weight"], first.policy.state_dict()["lm_head.weight"].cpu())

    resumed = _sync_module(tok)
    make_trainer(tmp_path / "c", 8).fit(resumed, ToyPrompts(), ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.ref_sync.optimizer_steps == straight.ref_sync.optimizer_steps == 8
    for part in ("policy", "_reference"):
        a, c = getattr(straight, part).state_dict(), getattr(resumed, part).state_dict()
        for key in a:
            assert torch.equal(a[key], c[key]), (part, key)


ZERO3_SCRIPT = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
import prpo_lightning.module
from prpo_lightning.runtime.models import load_causal_lm
from prpo_lightning.training.refsync import mix_into_reference
from prpo_lightning.runtime.zero3 import transformers_zero3, unpartitioned_copy
cfg = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, pad_token_id=0)
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
with deepspeed.zero.Init(config_dict_or_path=ds), transformers_zero3(ds):
    policy = load_causal_lm(None, cfg, seed=0)
ref = unpartitioned_copy(policy, torch.device("cpu"))
with torch.no_grad():
    for p in ref.parameters():
        p.fill_(2.0)
mix_into_reference(policy, ref, 0.25)
with deepspeed.zero.GatheredParameters(list(policy.parameters())):
    full = {k: v.detach().clone() for k, v in policy.named_parameters()}
own = dict(ref.named_parameters())
print("PARTITIONED", next(policy.parameters()).numel() == 0)
print("MIXED", all(torch.allclose(own[k], 0.25 * full[k] + 1.5, atol=1e-6, rtol=0) for k in full))
"""


@pytest.mark.slow
def test_mix_gathers_zero3_partitioned_parameters(tmp_path):
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "zero3_mix.py"
    script.write_text(ZERO3_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(root), PORT="29547", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines["PARTITIONED"] == "True" and lines["MIXED"] == "True"
