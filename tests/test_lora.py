"""LoRA via PEFT (``model.lora``): only the adapters train, the reference is the base with the adapters disabled
(no copy), checkpoints hold the adapters only and resume exactly, exports and engines get merged weights."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")

from test_resume import ToyPrompts, cli_fit_args, make_module, make_trainer, tokenizer_dir  # noqa: E402

from prpo_lightning.cli import cli_main  # noqa: E402
from prpo_lightning.export import export_checkpoint  # noqa: E402
from prpo_lightning.training.logprobs import batched_logprobs  # noqa: E402
from prpo_lightning.training.lora import AdapterDisabledReference, as_lora_config, merged_weights
from prpo_lightning.config import LoRAConfig  # noqa: E402

LORA = LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return tokenizer_dir(tmp_path_factory.mktemp("lora_tok"))


def _lora_module(tok: str, **kw):
    return make_module(tok, lora=LORA, **kw)


def _randomise_adapters(policy: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero (the wrapped model equals the base); give it values so merged ≠ base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_config_is_checked():
    for bad in (dict(r=0), dict(alpha=0.0), dict(dropout=1.0), dict(target_modules=[])):
        with pytest.raises(ValueError, match="model.lora"):
            LoRAConfig(**bad)


def test_ref_sync_with_lora_is_refused(tok):
    from prpo_lightning.config import RefSyncConfig

    with pytest.raises(ValueError, match="model.lora"):
        _lora_module(tok, ref_sync=RefSyncConfig(sync_ref_model=True))


def test_only_adapters_train_and_reference_is_the_base_without_copy(tok, tmp_path, monkeypatch):
    deepcopies = []
    real_deepcopy = copy.deepcopy

    def recording_deepcopy(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            deepcopies.append(type(obj).__name__)
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", recording_deepcopy)
    module = _lora_module(tok)
    module.configure_model()
    assert not deepcopies  # no module (the policy) was copied for the reference
    assert isinstance(module._reference, AdapterDisabledReference) and module._reference.policy is module.policy
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 3 target modules × 2 layers × (A, B)
    assert len(trainable) == 12
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    make_trainer(tmp_path, 1).fit(module, ToyPrompts())
    assert not deepcopies
    opt_params = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.policy.parameters() if p.requires_grad}
    changed = {n for n, p in module.policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    assert any(".lora_B." in n for n in changed)  # B leaves zero: the adapters now change the model

    # reference log-probs = the base model's (a plain copy of the base, adapters removed)
    base = copy.deepcopy(module.policy).unload()
    ids = torch.randint(3, 100, (2, 5))
    p_mask, c_ids, c_mask = torch.ones(2, 5, dtype=torch.long), torch.randint(3, 100, (2, 4)), torch.ones(2, 4, dtype=torch.long)
    ref, _ = batched_logprobs(module._reference, ids, p_mask, c_ids, c_mask, 1.0, 2, with_entropy=False)  # (2, 4)
    want, _ = batched_logprobs(base, ids, p_mask, c_ids, c_mask, 1.0, 2, with_entropy=False)  # (2, 4)
    policy_lp, _ = batched_logprobs(module.policy, ids, p_mask, c_ids, c_mask, 1.0, 2, with_entropy=False)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-6)
    assert not torch.allclose(policy_lp, want)  # the adapters are back on after the reference pass


@pytest.mark.slow
def test_checkpoint_holds_adapters_only_and_resume_is_exact(tok, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = _lora_module(tok)
    make_trainer(tmp_path / "a", 4).fit(straight, ToyPrompts())

    first = _lora_module(tok)
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path / "b"), save_last=True, every_n_train_steps=1)
    make_trainer(tmp_path / "b", 2, [ckpt_cb], enable_checkpointing=True).fit(first, ToyPrompts())
    last = tmp_path / "b" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys == {"policy." + n for n, p in first.policy.named_parameters() if p.requires_grad}
    assert all(".lora_" in k for k in keys)

    resumed = _lora_module(tok)
    make_trainer(tmp_path / "c", 4).fit(resumed, ToyPrompts(), ckpt_path=str(last))
    a, c = straight.policy.state_dict(), resumed.policy.state_dict()
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k

    # other LoRA settings cannot resume from it
    other = make_module(tok, lora=LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoRA adapters"):
        make_trainer(tmp_path / "d", 4).fit(other, ToyPrompts(), ckpt_path=str(last))

    # export merges: the exported plain model's logits equal the PEFT policy's
    out = export_checkpoint(last, tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in exported.named_parameters())
    first.policy.eval()
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, first.policy(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_merged_weights_are_base_names_and_equal_merge_and_unload(tok):
    module = _lora_module(tok)
    module.configure_model()
    _randomise_adapters(module.policy)
    streamed = dict(merged_weights(module.policy))
    merged = copy.deepcopy(module.policy).merge_and_unload()
    want = dict(merged.named_parameters(remove_duplicate=False))
    assert streamed.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(streamed[name], tensor.detach(), rtol=0, atol=1e-6)
    base = copy.deepcopy(module.policy).unload()
    q = "model.layers.0.self_attn.q_proj.weight"
    layer = module.policy.base_model.model.model.layers[0].self_attn.q_proj
    scale = LORA.alpha / LORA.r
    hand = base.state_dict()[q] + scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # (out, in)
    torch.testing.assert_close(streamed[q], hand, rtol=0, atol=1e-6)
    assert not torch.allclose(streamed[q], base.state_dict()[q])


def test_export_policy_merges_a_peft_model(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from prpo_lightning.export import export_policy

    module = _lora_module(tok)
    module.configure_model()
    _randomise_adapters(module.policy, seed=1)
    out = export_policy(module.policy, None, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    module.policy.eval()
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, module.policy(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert any(".lora_A." in n for n, _ in module.policy.named_parameters())  # the policy keeps its adapters


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "prpo"])
def test_fit_two_steps_through_cli_with_lora(tmp_path, tok, method, monkeypatch):
    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    aligner = {"grpo": "components.aligners.GRPOAligner", "prpo": "components.aligners.PRPOAligner"}[method]
    args = cli_fit_args(tmp_path, tok, 2, f"--model.aligner={aligner}", "--model.verifier=components.verifiers.SympyMathVerifier",
                        "--model.loss.kl_coef=0.01", "--model.lora.r=4", "--trainer.enable_checkpointing=false",
                        "--data=prpo_lightning.data.ArithmeticDataModule", "--data.num_train=8", "--data.num_eval=2",
                        "--data.batch_size=2")
    if method == "prpo":
        args += ["--model.segmenter=components.segmenters.EntropySpikeSegmenter", "--model.segmenter.min_gap=4",
                 "--model.prm=components.prms.EquationCheckPRM"]
    cli = cli_main(args)
    assert cli.trainer.global_step == 2
    assert as_lora_config(cli.model.hparams.lora) == LoRAConfig(r=4)
    assert isinstance(cli.model._reference, AdapterDisabledReference)
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/kl", "train/reward/mean"):
        assert torch.isfinite(metrics[key]), key


def test_vllm_sync_streams_merged_weights_with_base_names(tok):
    """``VLLMEngine``'s weight stream (importable without vLLM): a PEFT policy is sent merged, under base names."""
    from components.engine_vllm import policy_weights

    module = _lora_module(tok)
    module.configure_model()
    _randomise_adapters(module.policy, seed=2)
    streamed = dict(policy_weights(module.policy))
    want = dict(copy.deepcopy(module.policy).merge_and_unload().named_parameters(remove_duplicate=False))
    assert streamed.keys() == want.keys()
    assert not any("lora" in k or "base_layer" in k for k in streamed)
    for name, tensor in want.items():
        torch.testing.assert_close(streamed[name], tensor.detach(), rtol=0, atol=1e-6)


def test_adapters_train_under_gradient_checkpointing(tok, tmp_path):
    module = _lora_module(tok, gradient_checkpointing=True)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    make_trainer(tmp_path, 1).fit(module, ToyPrompts())
    changed = [n for n, p in module.policy.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert any(".lora_B." in n for n in changed)


def test_export_callback_writes_the_merged_policy(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from prpo_lightning.export import HFExportCallback

    module = _lora_module(tok)
    module.configure_model()
    _randomise_adapters(module.policy, seed=3)
    HFExportCallback()._write(module.policy, None, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    module.policy.eval()
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, module.policy(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
