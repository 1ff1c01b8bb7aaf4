"""Shared fixtures: where the offline M3GNet checkpoints live, and thread settings for a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Checkpoints are read from ../shared/models next to the checkout (never committed); GLOBOPT_MODELS wins.
DEFAULT_SHARED_MODELS = REPO_ROOT.parent / "shared" / "models"

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "GLOBOPT_MODELS" not in os.environ and DEFAULT_SHARED_MODELS.is_dir():
    os.environ["GLOBOPT_MODELS"] = str(DEFAULT_SHARED_MODELS)


def _models_dirs() -> list[Path]:
    return [Path(p) for p in os.environ.get("GLOBOPT_MODELS", "").split(os.pathsep) if p]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The folder holding M3GNet-MP-2021.2.8-PES; tests needing the real potential skip without it."""
    for folder in _models_dirs():
        if (folder / "M3GNet-MP-2021.2.8-PES" / "model.pt").is_file():
            return folder
    pytest.skip("M3GNet checkpoints not found: set GLOBOPT_MODELS or place ../shared/models beside the repo")


@pytest.fixture(scope="session")
def m3gnet_reference(models_dir: Path) -> dict:
    import json

    return json.loads((models_dir / "m3gnet_reference.json").read_text())
