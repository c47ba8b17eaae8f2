"""The published-method configs select valid components and differ from configs/prpo.yaml only in them."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from prpo_lightning.scoring.aligner import AdvantageAligner
from prpo_lightning.scoring.prm import ProcessRewardModel
from prpo_lightning.scoring.segmenter import Segmenter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINE = {
    "process_only": "ProcessOnlyAligner",
    "prm_avg": "PRMAvgAligner",
    "spro": "SPROAligner",
    "pure": "PUREAligner",
}
COMPONENTS = ("segmenter", "prm", "aligner")


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def instantiate(spec: dict):
    module, _, cls = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**(spec.get("init_args") or {}))


def strip_components(cfg: dict) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    for key in COMPONENTS:
        cfg["model"].pop(key, None)
    cfg["trainer"]["logger"]["init_args"].pop("name", None)
    return cfg


@pytest.mark.parametrize("name", sorted(MINE))
def test_method_config_components_instantiate(name):
    cfg = load(name)
    aligner = instantiate(cfg["model"]["aligner"])
    assert isinstance(aligner, AdvantageAligner) and type(aligner).__name__ == MINE[name]
    if aligner.needs.process_scores:
        assert isinstance(instantiate(cfg["model"]["segmenter"]), Segmenter)
        prm = instantiate(cfg["model"]["prm"])  # no weights are loaded before setup()
        assert isinstance(prm, ProcessRewardModel) and prm.model is None
    else:
        assert "segmenter" not in cfg["model"] and "prm" not in cfg["model"]
    assert cfg["trainer"]["logger"]["init_args"]["name"] == name


@pytest.mark.parametrize("name", sorted(MINE))
def test_method_config_differs_from_prpo_only_in_components(name):
    if not (CONFIGS / "prpo.yaml").exists():
        pytest.skip("configs/prpo.yaml not written yet")
    assert strip_components(load(name)) == strip_components(load("prpo"))
