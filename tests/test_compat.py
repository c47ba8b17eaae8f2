"""Forward compatibility: the version-dependent transformers names (prpo_lightning.runtime.compat) and the test-suite guard
that fails a test on a DeprecationWarning/FutureWarning triggered by a call in project code (tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from prpo_lightning.runtime.compat import cache_kwarg, enable_activation_checkpointing, output_cache
from prpo_lightning.training.logprobs import completion_logprobs

REPO = Path(__file__).resolve().parents[1]
V = 64
TRANSFORMERS_RENAMED_CACHE = "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
TRANSFORMERS_RENAMED_CHECKPOINTING = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def _tiny(model_type: str = "qwen2") -> torch.nn.Module:
    cfg = AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


# ------------------------------------------------------------------------------------------- cache name
class _NewStyle(torch.nn.Module):
    def forward(self, input_ids: Any = None, cache: Any = None) -> None: ...


class _OldStyle(torch.nn.Module):
    def forward(self, input_ids: Any = None, past_key_values: Any = None) -> None: ...


class _KwargsOnly(torch.nn.Module):
    def forward(self, **kwargs: Any) -> None: ...


def test_cache_kwarg_follows_the_forward_signature_else_the_installed_library():
    assert cache_kwarg(_NewStyle()) == "cache"
    assert cache_kwarg(_OldStyle()) == "past_key_values"
    assert cache_kwarg(_KwargsOnly()) == ("cache" if TRANSFORMERS_RENAMED_CACHE else "past_key_values")


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_real_models_take_the_installed_libraries_cache_name(model_type):
    model = _tiny(model_type)
    name = cache_kwarg(model)
    assert name == ("cache" if TRANSFORMERS_RENAMED_CACHE else "past_key_values")
    out = model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True)
    cache = output_cache(out)
    assert cache is not None and cache.get_seq_length() == 3


@dataclasses.dataclass
class _OldOutput:  # transformers <= 5.23: the cache field is `past_key_values`
    logits: torch.Tensor
    past_key_values: Any = None


@dataclasses.dataclass
class _NewOutput:  # transformers >= 5.24: the cache field is `cache`
    logits: torch.Tensor
    cache: Any = None


def test_output_cache_reads_the_field_the_output_class_declares():
    logits, marker = torch.zeros(1), object()
    assert output_cache(_OldOutput(logits, marker)) is marker
    assert output_cache(_NewOutput(logits, marker)) is marker
    assert output_cache(_NewOutput(logits)) is None


def test_output_cache_refuses_tuple_outputs():
    with pytest.raises(TypeError, match="output_cache.*return_dict=True"):
        output_cache((torch.zeros(1), None))


class _PreRenameQwen2(torch.nn.Module):
    """A causal LM with transformers <= 5.23's interface: forward takes ``past_key_values`` and returns it in a
    ``past_key_values`` field. It records the cache keyword it was called with."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.cache_keywords: list[str] = []

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        if past_key_values is not None:
            self.cache_keywords.append("past_key_values")
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep,
                         **({cache_kwarg(self.inner): past_key_values} if past_key_values is not None else {}))
        return _OldOutput(logits=out.logits, past_key_values=output_cache(out))


def test_shared_prompts_work_with_a_pre_rename_model():
    """The shared-prompt pass hands the cache back under the name the model's forward declares."""
    model = _PreRenameQwen2(_tiny("qwen2")).eval()
    prompts = torch.tensor([[0, 5, 6, 7], [0, 5, 6, 7], [8, 9, 10, 11]])  # (3, 4): rows 0 and 1 share a prompt
    mask = prompts != 0  # (3, 4) left padding
    comp = torch.tensor([[12, 13, 1], [14, 1, 0], [15, 16, 17]])  # (3, 3)
    cmask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)  # (3, 3)
    with torch.no_grad():
        shared, _ = completion_logprobs(model, prompts, mask, comp, cmask, share_prompts=True)  # (3, 3)
        assert model.cache_keywords == ["past_key_values"]
        separate, _ = completion_logprobs(model, prompts, mask, comp, cmask, share_prompts=False)  # (3, 3)
    assert torch.allclose(shared, separate, atol=1e-5)


# ------------------------------------------------------------------------------- activation checkpointing
class _Recorder:
    def __init__(self, *methods: str):
        self.calls: list[str] = []
        for name in methods:
            setattr(self, name, lambda name=name: self.calls.append(name))


def test_activation_checkpointing_uses_the_new_name_where_it_exists():
    both = _Recorder("activation_checkpointing_enable", "gradient_checkpointing_enable")
    enable_activation_checkpointing(both)
    assert both.calls == ["activation_checkpointing_enable"]
    old_only = _Recorder("gradient_checkpointing_enable")
    enable_activation_checkpointing(old_only)
    assert old_only.calls == ["gradient_checkpointing_enable"]


def test_activation_checkpointing_refuses_a_non_hf_model():
    with pytest.raises(TypeError, match="neither activation_checkpointing_enable nor gradient_checkpointing_enable"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_activation_checkpointing_on_a_real_model_warns_nothing():
    model = _tiny("qwen2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_activation_checkpointing(model)
    on = model.is_activation_checkpointing if TRANSFORMERS_RENAMED_CHECKPOINTING else model.is_gradient_checkpointing
    assert on
    assert [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))] == []


def test_module_turns_on_activation_checkpointing_without_a_deprecated_call(tmp_path):
    """``PRPOModule(gradient_checkpointing=True).configure_model()`` (the tests' guard fails a deprecated call)."""
    from test_resume import make_module, tokenizer_dir

    module = make_module(tokenizer_dir(tmp_path), gradient_checkpointing=True)
    module.configure_model()
    policy = module.policy
    flag = "is_activation_checkpointing" if TRANSFORMERS_RENAMED_CHECKPOINTING else "is_gradient_checkpointing"
    assert getattr(policy, flag)
    assert policy.config.use_cache is False


# ------------------------------------------------------------------------------------ the warning guard
def test_pytest_config_ignores_no_deprecation_category_wholesale():
    entries = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"].get(
        "filterwarnings", []
    )
    for entry in entries:
        action, message, category = (entry.split(":") + ["", ""])[:3]
        if action == "ignore" and category.split(".")[-1] in ("", "Warning", "DeprecationWarning", "FutureWarning"):
            assert message.strip(), f"pyproject ignores a whole warning category: {entry!r}"


_THIRD_PARTY = '''
import warnings

def old_api():
    warnings.warn("old_api is deprecated", DeprecationWarning, stacklevel=2)

def calls_old_api():  # a third-party library using another's deprecated API: not the project's business
    import thirdparty_old
    thirdparty_old.old_api()
'''

_GUARDED_TESTS = '''
import warnings
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, GenerationMixin
import inspect
import thirdparty_old, thirdparty_user

PROBE_SOURCE = """
import thirdparty_old

def call_old_api():
    thirdparty_old.old_api()

def swallow_old_api():
    try:
        thirdparty_old.old_api()
    except Exception:
        pass

def enable_old_checkpointing(model):
    model.gradient_checkpointing_enable()

def forward_with_old_cache_name(model):
    return model(input_ids=torch.tensor([[3, 4, 5]]), past_key_values=None)

def warn_own_deprecation():
    import warnings
    warnings.warn("knob is deprecated", FutureWarning, stacklevel=2)
"""
# code compiled under a path inside the project's package, as project code is
probe = {"__name__": "prpo_lightning._deprecation_probe", "torch": torch}
exec(compile(PROBE_SOURCE, PROBE_PATH, "exec"), probe)


def tiny():
    cfg = AutoConfig.for_model("qwen2", vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(cfg)


def test_project_calls_a_deprecated_api():
    probe["call_old_api"]()

def test_project_calls_a_deprecated_api_and_swallows_the_error():
    probe["swallow_old_api"]()

def test_project_warns_its_own_deprecation():
    probe["warn_own_deprecation"]()

def test_pytest_warns_still_records_an_expected_deprecation():
    with pytest.warns(FutureWarning, match="knob is deprecated"):
        probe["warn_own_deprecation"]()

def test_test_code_calls_a_deprecated_api():
    thirdparty_old.old_api()

def test_third_party_code_calls_a_deprecated_api():
    thirdparty_user.calls_old_api()

def test_project_calls_gradient_checkpointing_enable():
    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):
        pytest.skip("this transformers does not deprecate gradient_checkpointing_enable")
    probe["enable_old_checkpointing"](tiny())

def test_project_passes_past_key_values_through_module_call():
    if "cache" not in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters:
        pytest.skip("this transformers does not deprecate past_key_values")
    probe["forward_with_old_cache_name"](tiny())
'''


def test_deprecated_calls_from_project_code_fail_the_test(tmp_path):
    """A pytest run with this suite's conftest over calls of deprecated APIs: those made by project code fail,
    those made by tests or by third-party code only warn."""
    (tmp_path / "thirdparty_old.py").write_text(_THIRD_PARTY)
    (tmp_path / "thirdparty_user.py").write_text("from thirdparty_old import calls_old_api\n")
    probe_path = REPO / "prpo_lightning" / "_deprecation_probe.py"  # never written: only the code's file name
    assert not probe_path.exists()
    (tmp_path / "test_guard.py").write_text(f"PROBE_PATH = {str(probe_path)!r}\n" + textwrap.dedent(_GUARDED_TESTS))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO), str(tmp_path)]))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-v",
         f"--rootdir={tmp_path}", str(tmp_path / "test_guard.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    outcomes = dict(re.findall(r"^test_guard\.py::(\w+) (PASSED|FAILED|SKIPPED)", run.stdout, re.M))
    on_new = "FAILED" if TRANSFORMERS_RENAMED_CHECKPOINTING else "SKIPPED"
    on_cache = "FAILED" if TRANSFORMERS_RENAMED_CACHE else "SKIPPED"
    expected = {
        "test_project_calls_a_deprecated_api": "FAILED",
        "test_project_calls_a_deprecated_api_and_swallows_the_error": "FAILED",
        "test_project_warns_its_own_deprecation": "FAILED",
        "test_pytest_warns_still_records_an_expected_deprecation": "PASSED",
        "test_test_code_calls_a_deprecated_api": "PASSED",
        "test_third_party_code_calls_a_deprecated_api": "PASSED",
        "test_project_calls_gradient_checkpointing_enable": on_new,
        "test_project_passes_past_key_values_through_module_call": on_cache,
    }
    assert outcomes == expected, run.stdout[-6000:] + run.stderr[-3000:]
    site = "deprecated call in project code at prpo_lightning/_deprecation_probe.py:5: old_api is deprecated"
    assert site in run.stdout
    if TRANSFORMERS_RENAMED_CACHE:
        assert "`past_key_values` is deprecated" in run.stdout
    assert run.returncode == 1
