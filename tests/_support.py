"""Test helpers: generated images, a tiny random-weight backbone, the shared data sets.

The project's own tests use images they make; tests on the real photos in
``../shared/data`` skip cleanly when that folder is absent.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


#: A 356k-parameter timm EfficientNet (160 px input): fast enough for every test.
TINY = "test_efficientnet"

SHARED_DATA = Path(
    os.environ.get("SKLTRANSFER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def requires_shared_data(name: str) -> Path:
    """Path of a shared data set, or skip the test if it is not on this machine."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared data set {name!r} not found at {path}")
    return path


def make_image(seed: int, size=(48, 40), tint=(0, 0, 0)) -> np.ndarray:
    """An RGB uint8 image: smooth gradients plus noise, shifted by a tint."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    noisy = base + rng.normal(0, 20, size=(h, w, 3)) + np.asarray(tint)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kwargs)
    return buffer.getvalue()
