"""The shipped demo policy: loaded from the package with no supervised phase, its start accuracy is the README's,
the package data is in a wheel, and ``prpo-demo-warmstart`` compares a rebuild with the shipped files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import prpo_lightning.runtime.models as models
from prpo_lightning.demo import policy, warmstart
from prpo_lightning.demo.arithmetic import is_correct, make_split

REPO = Path(__file__).resolve().parents[1]
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "warm_start.json")


def test_shipped_policy_loads_from_the_package_without_sft(tmp_path, monkeypatch):
    monkeypatch.setenv("PRPO_CACHE", str(tmp_path))

    def no_sft(*args, **kwargs):
        raise AssertionError("the shipped policy must not run the supervised phase")

    monkeypatch.setattr(policy, "warm_start", no_sft)
    assert policy.MODEL_NAME in models.builtin_model_names()
    path = models.resolve_model_path(policy.MODEL_NAME)
    assert Path(path) == policy.SHIPPED_DIR
    assert not any(tmp_path.iterdir())  # nothing built, copied or cached
    model = models.load_causal_lm(policy.MODEL_NAME)
    tok = models.load_tokenizer(policy.MODEL_NAME)
    assert model.config.model_type == "qwen2"
    assert {k: getattr(model.config, k) for k in policy.MODEL_SIZE} == policy.MODEL_SIZE
    assert sum(p.numel() for p in model.parameters()) == 871_040
    text = policy.format_prompt("((11 - 5) / 2) / 3") + "11 - 5 = 6\n6 / 2 = 3\n3 / 3 = 1\n\\boxed{1}"
    assert tok(text)["input_ids"] == policy.build_tokenizer()(text, add_special_tokens=False)["input_ids"]
    meta = json.loads((policy.SHIPPED_DIR / "warm_start.json").read_text())
    sft = {k: meta["sft"][k] for k in ("seed", "batch_size", "lr", "warmup_steps", "max_steps", "target_accuracy")}
    assert sft == {k: policy.SFT_DEFAULTS[k] for k in sft}  # made with the documented settings
    assert meta["sft"]["steps"] == policy.SFT_DEFAULTS["max_steps"] == 600
    assert meta["built_with"]["torch_threads"] == 1


def test_shipped_files_are_package_data():
    from importlib.resources import files

    shipped = files("prpo_lightning.demo") / "weights" / "arith-qwen2-tiny"
    assert all((shipped / f).is_file() for f in SHIPPED_FILES)
    data = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "weights/arith-qwen2-tiny/*" in data["prpo_lightning.demo"]


def test_missing_shipped_files_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(models._SHIPPED_MODELS, "prpo-test/shipped-missing", tmp_path)
    with pytest.raises(FileNotFoundError, match="reinstall prpo-lightning"):
        models.resolve_model_path("prpo-test/shipped-missing")


def _readme_start_accuracy() -> float:
    match = re.search(r"\*\*(\d+\.\d)% before RL", (REPO / "README.md").read_text(encoding="utf-8"))
    assert match, "README.md must quote the demo's start accuracy as **X.Y% before RL"
    return float(match.group(1))


def test_start_accuracy_of_the_shipped_policy_is_the_readme_number():
    """Greedy accuracy on the demo's 200 held-out problems (configs/demo.yaml: task seed 1234, 64 new tokens)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = models.load_causal_lm(policy.MODEL_NAME)
        tok = models.load_tokenizer(policy.MODEL_NAME)
        _, held = make_split(seed=1234, n_train=5000, n_eval=200)
        completions = policy.generate(model, tok, held, max_new_tokens=64)
    finally:
        torch.set_num_threads(threads)
    accuracy = 100.0 * sum(is_correct(c, p["answer"]) for c, p in zip(completions, held)) / len(held)
    assert abs(accuracy - _readme_start_accuracy()) <= 1.0, (accuracy, _readme_start_accuracy())


def _tiny_policy(out: Path) -> Path:
    policy.warm_start(out, max_steps=2, eval_every=2, n_dev=2, n_held_out=4, batch_size=4, progress=False)
    return out


def test_compare_verdicts(tmp_path, capsys):
    a = _tiny_policy(tmp_path / "a")
    b = _tiny_policy(tmp_path / "b")
    same = warmstart.compare(a, b)
    assert same["verdict"] == "identical" and same["max_abs_weight_diff"] == 0.0
    assert same["identical_tensors"] == same["tensors"] and same["same_greedy_completions"] == 1.0
    assert warmstart.main(["--compare-only", str(a), "--shipped", str(b)]) == 0
    assert "IDENTICAL" in capsys.readouterr().out

    from safetensors.torch import load_file, save_file

    weights = load_file(str(b / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name].clone()
    weights[name][0, 0] += 0.25
    save_file(weights, str(b / "model.safetensors"), metadata={"format": "pt"})
    moved = warmstart.compare(a, b)
    assert moved["max_abs_weight_diff"] == pytest.approx(0.25)
    assert moved["identical_tensors"] == moved["tensors"] - 1
    held_equal = abs(moved["accuracy_rebuilt"] - moved["accuracy_shipped"]) * 100 <= warmstart.EQUIVALENT_POINTS
    assert moved["verdict"] == ("equivalent" if held_equal else "different")

    (b / "tokenizer.json").write_text((b / "tokenizer.json").read_text().replace("<unk>", "<UNK>"))
    assert warmstart.compare(a, b)["verdict"] == "different"
    assert warmstart.main(["--compare-only", str(a), "--shipped", str(b)]) == 1


@pytest.mark.slow
def test_wheel_holds_the_shipped_policy_and_an_spdx_license(tmp_path):
    """A normal (non-editable) install gets the policy: the wheel built with the pinned setuptools holds it."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deprecated" not in (proc.stdout + proc.stderr).lower(), proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("prpo_lightning-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    for f in SHIPPED_FILES:
        assert f"prpo_lightning/demo/weights/arith-qwen2-tiny/{f}" in names, f
    assert "License-Expression: Apache-2.0" in metadata
    assert "prpo-demo-warmstart = prpo_lightning.demo.warmstart:console_main" in entry_points
