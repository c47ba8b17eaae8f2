"""Item 8 of issue 12: config values are checked before any model loads, and the error names the key and its range.

Every case goes through ``prpo-fit`` (``cli_main``) on the demo config with a tiny random policy swapped in; model
loading is patched to fail loudly, so a check that came after a load would show up as the wrong error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import build_char_tokenizer, tiny_qwen2_config
from prpo_lightning.cli import cli_main
from prpo_lightning.module import PRPOModule

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    """LightningCLI reads sys.argv; and any attempt to load weights or a tokenizer is an error here."""
    import transformers

    monkeypatch.setattr("sys.argv", ["prpo-fit"])

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    for name in ("from_pretrained", "from_config"):
        monkeypatch.setattr(transformers.AutoModelForCausalLM, name, refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory) -> str:
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _demo(tmp_path: Path, tokenizer: str, *extra: str, policy: str | None = None) -> list[str]:
    model = ([f"--model.policy={policy}", "--model.policy_config=null"] if policy else
             ["--model.policy=null", f"--model.policy_config={json.dumps(tiny_qwen2_config(vocab_size=128))}"])
    return ["--config", str(REPO / "configs" / "demo.yaml"), f"--trainer.default_root_dir={tmp_path}",
            *model, f"--model.tokenizer={tokenizer}", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.sampling.num_generations=0"], "model.sampling.num_generations must be an integer >= 1"),
        (["--model.sampling.num_generations=-2"], "model.sampling.num_generations must be an integer >= 1"),
        (["--model.sampling.temperature=0"], "model.sampling.temperature must be > 0"),
        (["--model.sampling.max_new_tokens=0"], "model.sampling.max_new_tokens must be an integer >= 1"),
        (["--model.sampling.top_p=0"], "model.sampling.top_p must be in (0, 1]"),
        (["--model.optim.lr=-1e-6"], "model.optim.lr must be > 0"),
        (["--model.optim.micro_batch_size=0"], "model.optim.micro_batch_size must be an integer >= 1"),
        (["--model.loss.kl_coef=-0.1"], "model.loss.kl_coef must be >= 0"),
        (["--model.sampling.num_generations=1", "--model.aligner=components.aligners.GRPOAligner"],
         "model.sampling.num_generations must be >= 2 with GRPOAligner"),
        (["--model.sampling.num_generations=1", "--model.aligner=components.aligners.RLOOAligner"],
         "model.sampling.num_generations must be >= 2 with RLOOAligner"),
    ],
    ids=["G=0", "G<0", "temperature=0", "max_new_tokens=0", "top_p=0", "negative-lr", "micro_batch_size=0",
         "negative-kl", "G=1-grpo", "G=1-rloo"],
)
def test_bad_values_fail_at_instantiation_naming_the_key(tmp_path, char_tokenizer, extra, message):
    with pytest.raises(ValueError) as info:
        cli_main(_demo(tmp_path, char_tokenizer, *extra), run=False)
    assert message in str(info.value)
    assert "got" in str(info.value)  # the value given is echoed


def test_valid_settings_still_instantiate(tmp_path, char_tokenizer):
    """Positive controls: the demo as shipped, and G = 1 with an aligner that is not group-relative (PRPO's process
    term has a fixed prior, so a single completion still gets a non-zero advantage)."""
    cli = cli_main(_demo(tmp_path, char_tokenizer, "--model.sampling.num_generations=1"), run=False)
    assert isinstance(cli.model, PRPOModule) and cli.model.sampling.num_generations == 1


def test_unknown_builtin_policy_suggests_the_close_name(tmp_path, char_tokenizer):
    """A misspelt builtin fails at once, naming the key and the close builtin, instead of retrying the hub."""
    with pytest.raises(ValueError) as info:
        cli_main(_demo(tmp_path, char_tokenizer, policy="prpo-demo/arith-qwen2-tiyn"), run=False)
    text = str(info.value)
    assert "model.policy: unknown builtin model 'prpo-demo/arith-qwen2-tiyn'" in text
    assert "did you mean 'prpo-demo/arith-qwen2-tiny'" in text


def test_lengths_beyond_the_context_window_fail_before_weights_load(tmp_path, char_tokenizer, monkeypatch):
    """max_prompt_length + max_new_tokens beyond max_position_embeddings: an error naming both keys, raised in
    ``prpo-fit fit`` after the (cheap) tokenizer and config are read but before any weights are built."""
    import transformers

    import prpo_lightning.runtime.models as models

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _tok(char_tokenizer))
    monkeypatch.setattr(models, "load_tokenizer", lambda name: _tok(char_tokenizer))
    args = _demo(tmp_path, char_tokenizer, "--model.sampling.max_prompt_length=4000",
                 "--model.sampling.max_new_tokens=200", "--trainer.logger=false", "--trainer.callbacks=[]")
    with pytest.raises(ValueError) as info:
        cli_main(["fit", *args])
    text = str(info.value)
    assert "model.sampling.max_prompt_length (4000) + model.sampling.max_new_tokens (200) = 4200" in text
    assert "(4096 positions)" in text


def _tok(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)
