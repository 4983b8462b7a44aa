"""Inference engines: OpenVINO on the CPU computes torch's features, converts once, falls back cleanly."""

from __future__ import annotations

import collections
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from skltransfer import FineTuneClassifier, PretrainedFeatures, clear_shared_backbones, load_image_folder
from skltransfer import engines
from skltransfer.cache import as_feature_cache
from skltransfer.decoding import decode_rgb
from skltransfer import runtime
from skltransfer.engines import EngineFallbackWarning, resolve_engine
from skltransfer.runtime import native_bfloat16

from _support import TINY

pytest.importorskip("openvino")

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_conversions_in_memory(monkeypatch):
    """Each test converts for itself (the process keeps conversions across registry clears)."""
    monkeypatch.setattr(engines, "_CONVERTED", collections.OrderedDict())


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _features(engine: str, cache, **params) -> PretrainedFeatures:
    return PretrainedFeatures(TINY, weights=None, engine=engine, cache=cache, **params)


def test_openvino_features_are_torch_features(image_folder):
    paths, _ = load_image_folder(image_folder)
    for params in ({}, {"layers": "all", "pooling": "gem", "tta": "flip"}):
        torch_rows = _features("torch", None, **params).fit_transform(paths)
        openvino = _features("openvino", None, **params).fit(paths)
        assert openvino._backbone(CPU, "openvino").engine == "openvino"  # really converted
        np.testing.assert_allclose(openvino.transform(paths), torch_rows, rtol=1e-4, atol=1e-6)


def test_auto_is_openvino_on_cpu_and_torch_for_a_users_module():
    assert resolve_engine("auto", CPU) == "openvino"
    assert resolve_engine("auto", CPU, user_module=True) == "torch"  # converting would trace its forward
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("auto", CPU, "float16") == "torch"


def test_impossible_engine_requests_are_refused_with_the_way_out(monkeypatch):
    with pytest.raises(ValueError, match="runs on the CPU.*engine='torch'"):
        resolve_engine("openvino", torch.device("cuda"))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        resolve_engine("openvino", CPU, "float16")
    monkeypatch.setattr(runtime, "native_bfloat16", lambda: False)
    with pytest.raises(ValueError, match="native bfloat16.*precision='float32'"):
        resolve_engine("auto", CPU, "bfloat16")


def test_invalid_engine_is_refused_at_fit(image_folder):
    paths, _ = load_image_folder(image_folder)
    with pytest.raises(ValueError, match="engine"):
        _features("tensorrt", None).fit(paths)


def test_float32_rows_are_shared_between_engines(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    reference = _features("torch", tmp_path / "c").fit_transform(paths)
    openvino = _features("openvino", tmp_path / "c").fit(paths)
    np.testing.assert_array_equal(openvino.transform(paths), reference)
    assert openvino.cache_info_.hits == len(paths)


def test_the_conversion_is_kept_next_to_the_cache_and_reused(image_folder, tmp_path, monkeypatch):
    paths, _ = load_image_folder(image_folder)
    first = _features("openvino", tmp_path / "c").fit_transform(paths)
    saved = list((tmp_path / "c" / "engines").glob("openvino-*/model.xml"))
    assert len(saved) == 1 and saved[0].with_suffix(".bin").stat().st_size > 0
    clear_shared_backbones()  # as a new process starts
    engines._CONVERTED.clear()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(engines, "_convert", no_conversion)
    again = _features("openvino", tmp_path / "c").fit(paths)
    backbone = again._backbone(CPU, "openvino", "float32", as_feature_cache(again.cache))
    assert backbone.engine == "openvino"
    pixels = torch.stack([backbone.preprocessing.resize_crop(decode_rgb(p)) for p in paths])
    np.testing.assert_allclose(backbone.model(pixels), first, rtol=1e-5, atol=1e-7)


def test_a_damaged_saved_conversion_is_converted_again(image_folder, tmp_path, monkeypatch):
    paths, _ = load_image_folder(image_folder)
    reference = _features("openvino", tmp_path / "c").fit_transform(paths)
    (xml,) = (tmp_path / "c" / "engines").glob("openvino-*/model.xml")
    xml.write_text("<not a model")
    clear_shared_backbones()
    engines._CONVERTED.clear()
    again = _features("openvino", None).fit(paths)
    again.set_params(cache=tmp_path / "c")
    backbone = again._backbone(CPU, "openvino", "float32", as_feature_cache(again.cache))
    assert backbone.engine == "openvino"
    rows = backbone.model(torch.zeros(2, 3, 160, 160, dtype=torch.uint8))
    assert rows.shape == (2, reference.shape[1])
    assert "<not a model" not in xml.read_text()  # replaced by a good conversion


def test_a_backbone_that_does_not_convert_runs_with_torch_after_one_warning(image_folder, monkeypatch):
    paths, _ = load_image_folder(image_folder)
    reference = _features("torch", None).fit_transform(paths)

    def unsupported(*args, **kwargs):
        raise RuntimeError("unsupported operation aten::mystery")

    monkeypatch.setattr(engines, "_convert", unsupported)
    features = _features("auto", None).fit(paths)
    with pytest.warns(EngineFallbackWarning, match="test_efficientnet.*aten::mystery.*engine='torch'"):
        rows = features.transform(paths)
    np.testing.assert_array_equal(rows, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and configuration, not per call
        features.transform(paths)


def test_a_new_process_reads_the_saved_conversion(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    _features("openvino", tmp_path / "c").fit_transform(paths)
    script = (
        "import sys, torch\n"
        "from skltransfer import engines, PretrainedFeatures\n"
        "from skltransfer.cache import as_feature_cache\n"
        "engines._convert = lambda *a, **k: sys.exit('converted again')\n"
        f"f = PretrainedFeatures({TINY!r}, weights=None, engine='openvino', cache=sys.argv[1]).fit([b'x'])\n"
        "b = f._backbone(torch.device('cpu'), 'openvino', 'float32', as_feature_cache(f.cache))\n"
        "assert b.engine == 'openvino'\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not native_bfloat16(), reason="this CPU has no native bfloat16 (AVX-512 BF16 / AMX)")
def test_openvino_bfloat16_rows_are_close_and_cached_apart(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    cache = tmp_path / "c"
    full = _features("openvino", cache).fit_transform(paths)
    half = _features("openvino", cache, precision="bfloat16").fit(paths)
    reduced = half.transform(paths)
    assert half.cache_info_.misses == len(paths)
    assert not np.array_equal(reduced, full)  # bfloat16 really ran
    assert _cosine(reduced, full).min() > 0.99
    torch_half = _features("torch", cache, precision="bfloat16").fit(paths)
    torch_half.transform(paths)
    assert torch_half.cache_info_.misses == len(paths)  # each engine rounds its own way


def test_finetuned_predictions_run_on_openvino_and_match_torch(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    clf = FineTuneClassifier(TINY, weights=None, epochs=1, engine="torch", random_state=0).fit(paths, labels)
    reference = clf.predict_proba(paths)
    clf.set_params(engine="openvino")
    np.testing.assert_allclose(clf.predict_proba(paths), reference, rtol=1e-4, atol=1e-6)
    assert list((tmp_path / "feature-cache" / "engines").glob("openvino-*/model.xml"))
