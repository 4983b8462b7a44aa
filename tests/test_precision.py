"""Forward-pass precision: 16-bit autocast on request (the CUDA default), float32 on CPU."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from skltransfer import PretrainedFeatures, load_image_folder
from skltransfer.runtime import native_bfloat16

from _support import TINY


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.skipif(not native_bfloat16(), reason="this CPU has no native bfloat16: precision='bfloat16' is refused")
def test_bfloat16_features_agree_with_float32_and_are_cached_apart(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    cache = tmp_path / "cache"
    full = PretrainedFeatures(TINY, weights=None, precision="float32", cache=cache).fit(paths)
    half = PretrainedFeatures(TINY, weights=None, precision="bfloat16", cache=cache).fit(paths)

    reference = full.transform(paths)
    reduced = half.transform(paths)
    # Computed, not served from the float32 rows: the precision is in the cache key.
    assert half.cache_info_.misses == len(paths) and half.cache_info_.hits == 0
    assert reduced.dtype == np.float32
    assert not np.array_equal(reduced, reference)  # bfloat16 really ran
    assert _cosine(reduced, reference).min() > 0.99


def test_auto_precision_is_float32_on_cpu(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    cache = tmp_path / "cache"
    explicit = PretrainedFeatures(TINY, weights=None, precision="float32", device="cpu", cache=cache)
    reference = explicit.fit_transform(paths)
    auto = PretrainedFeatures(TINY, weights=None, device="cpu", cache=cache).fit(paths)
    np.testing.assert_array_equal(auto.transform(paths), reference)
    assert auto.cache_info_.hits == len(paths)


def test_a_model_pickled_before_the_precision_parameter_runs_in_float32(image_folder):
    paths, _ = load_image_folder(image_folder)
    fitted = PretrainedFeatures(TINY, weights=None, precision="float32", cache=None).fit(paths)
    state = dict(fitted.__getstate__())
    del state["precision"]  # what skltransfer 0.1.0 pickled
    old = PretrainedFeatures.__new__(PretrainedFeatures)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert old.get_params()["precision"] == "float32"
    np.testing.assert_array_equal(old.transform(paths), fitted.transform(paths))


def test_bfloat16_on_a_cpu_without_it_is_refused_at_fit_saying_why(image_folder, monkeypatch):
    from skltransfer import runtime

    monkeypatch.setattr(runtime, "native_bfloat16", lambda: False)
    paths, _ = load_image_folder(image_folder)
    with pytest.raises(ValueError, match="native bfloat16"):
        PretrainedFeatures(TINY, weights=None, precision="bfloat16", device="cpu").fit(paths)
