"""Shared paths and the loaded tiny checkpoint for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY = Path(__file__).parents[1] / "src" / "ovis2_xinf" / "assets" / "tiny-ovis2"
CASES_DIR = FIXTURES / "tiny-ovis2-cases"


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return TINY


@pytest.fixture(scope="session")
def cases() -> dict:
    return json.loads((CASES_DIR / "cases.json").read_text())


@pytest.fixture(scope="session")
def reference_tensors() -> dict:
    from safetensors.torch import load_file

    return load_file(str(CASES_DIR / "tensors.safetensors"))


@pytest.fixture(scope="session")
def tiny_model():
    from ovis2_xinf.loader import load_model

    return load_model(TINY)
