from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real datasets: $CM_DATA_DIR, else ../shared/datasets beside the checkout."""
    path = Path(os.environ.get("CM_DATA_DIR") or REPO.parent / "shared" / "datasets")
    if not (path / "massive").is_dir():
        pytest.fail(f"datasets not found at {path}: set CM_DATA_DIR")
    return path


@pytest.fixture
def write(tmp_path: Path):
    """Write a text file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return _write
