"""Fixtures shared by all test folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import save_tiny_model


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny-llama")
