"""Fixtures shared by the tests (helpers live in _support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _support import encode, make_image
from skltransfer import clear_shared_backbones


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """tmp/images/{red,blue}/*.jpg|png: 8 images a class, clearly separable."""
    root = tmp_path / "images"
    for offset, label, tint in ((0, "red", (120, -60, -60)), (100, "blue", (-60, -60, 120))):
        (root / label).mkdir(parents=True)
        for i in range(8):
            fmt, ext = ("PNG", "png") if i % 4 == 0 else ("JPEG", "jpg")
            pixels = make_image(seed=offset + i, tint=tint)
            (root / label / f"{label}_{i}.{ext}").write_bytes(encode(pixels, fmt))
    return root


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path, monkeypatch):
    """cache="auto" writes into this test's own folder, never the user's home, and shares with no store."""
    monkeypatch.setenv("SKLTRANSFER_CACHE_DIR", str(tmp_path / "feature-cache"))
    monkeypatch.delenv("SKLTRANSFER_CACHE_URL", raising=False)


@pytest.fixture(autouse=True)
def _fresh_shared_backbones():
    """Every test starts with no shared model, so build counts are exact."""
    clear_shared_backbones()
    yield
    clear_shared_backbones()
