"""precision="int8": a network calibrated at fit, quantised by ONNX Runtime, run on the CPU."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

pytest.importorskip("onnxruntime")

import skltransfer
from skltransfer import PretrainedFeatures, load_image_folder, quantization
from skltransfer.quantization import CALIBRATION_IMAGES, calibration_sample, full_range_int8
from skltransfer.registry import clear_shared_backbones

from _support import TINY, make_image, requires_shared_data


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.stack([make_image(seed + i, size=(64, 64)) for i in range(n)])


def test_int8_features_follow_float32_and_are_cached_apart(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    cache = tmp_path / "cache"
    full = PretrainedFeatures(TINY, weights=None, cache=cache).fit(paths)
    int8 = PretrainedFeatures(TINY, weights=None, precision="int8", cache=cache).fit(paths)

    reference = full.transform(paths)
    quantised = int8.transform(paths)
    assert int8.cache_info_.misses == len(paths) and int8.cache_info_.hits == 0  # not float32's rows
    assert quantised.dtype == np.float32 and quantised.shape == reference.shape
    assert not np.array_equal(quantised, reference)  # int8 really ran
    assert _cosine(quantised, reference).min() > 0.95
    assert full.calibration_ is None
    assert int8.calibration_.images == len(paths)
    # A second transform is served from the cache, row for row.
    assert np.array_equal(int8.transform(paths), quantised) and int8.cache_info_.hits == len(paths)


def test_calibration_is_reproducible_and_bounded():
    images = _images(12)
    a = PretrainedFeatures(TINY, weights=None, precision="int8", cache=None).fit(images)
    b = PretrainedFeatures(TINY, weights=None, precision="int8", cache=None).fit(images)
    assert a.calibration_ == b.calibration_ and a.calibration_.digest == b.calibration_.digest
    other = PretrainedFeatures(TINY, weights=None, precision="int8", cache=None).fit(_images(12, seed=50))
    assert other.calibration_.digest != a.calibration_.digest  # the ranges come from the images
    # A large training set calibrates on a fixed-size sample, the same one every time.
    assert len(calibration_sample(10_000)) == CALIBRATION_IMAGES
    assert calibration_sample(10_000) == calibration_sample(10_000)


def test_saved_int8_model_scores_the_same_in_a_fresh_process_without_its_training_images(tmp_path):
    images, y = _images(16), np.arange(16) % 2
    clf = make_pipeline(PretrainedFeatures(TINY, weights=None, precision="int8", cache=None),
                        LogisticRegression(max_iter=500)).fit(images, y)
    path = tmp_path / "model.skops"
    skltransfer.save(clf, path)
    np.save(tmp_path / "x.npy", images[:6])
    expected = clf.predict_proba(images[:6])
    # A new process, a new cache folder: the int8 network is rebuilt from the calibration alone.
    script = (
        "import sys, numpy as np, skltransfer\n"
        "m = skltransfer.load(sys.argv[1])\n"
        "np.save(sys.argv[3], m.predict_proba(np.load(sys.argv[2])))\n"
    )
    env = dict(os.environ, SKLTRANSFER_CACHE_DIR=str(tmp_path / "other-cache"))
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
                   check=True, env=env)
    got = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_int8_network_is_kept_on_disk_for_the_next_process(tmp_path, monkeypatch):
    images = _images(8)
    features = PretrainedFeatures(TINY, weights=None, precision="int8", cache=tmp_path / "a").fit(images)
    first = features.transform(images)
    kept = list((tmp_path / "a" / "engines").glob("int8-*/model.onnx"))
    assert len(kept) == 1
    # As in a new process on a machine whose feature cache is empty but whose engines folder has
    # the network: it is read back, neither exported nor quantised again.
    shutil.copytree(tmp_path / "a" / "engines", tmp_path / "b" / "engines")
    clear_shared_backbones()
    monkeypatch.setattr(quantization, "_NETWORKS", type(quantization._NETWORKS)())
    monkeypatch.setattr(quantization, "_FLOAT", type(quantization._FLOAT)())

    def refuse(*args, **kwargs):
        raise AssertionError("the kept int8 network should have been read, not made again")

    monkeypatch.setattr(quantization, "quantize", refuse)
    monkeypatch.setattr(quantization, "network_onnx", refuse)
    again = pickle.loads(pickle.dumps(features))
    again.cache = tmp_path / "b"
    np.testing.assert_array_equal(again.transform(images), first)
    assert again.cache_info_.misses == len(images)


def test_int8_export_computes_what_the_library_computes(tmp_path):
    import onnx
    import onnxruntime as ort

    images, y = _images(16), np.arange(16) % 2
    clf = make_pipeline(PretrainedFeatures(TINY, weights=None, precision="int8", cache=None),
                        LogisticRegression(max_iter=500)).fit(images, y)
    path = skltransfer.export(clf, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(None, {"image": images})
    np.testing.assert_array_equal(labels, clf.predict(images))
    np.testing.assert_allclose(probabilities, clf.predict_proba(images), atol=1e-4)
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["skltransfer.precision"] == "int8"
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    float_path = skltransfer.export(make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None),
                                                  LogisticRegression(max_iter=500)).fit(images, y),
                                    tmp_path / "float.onnx")
    assert "QuantizeLinear" not in {node.op_type for node in onnx.load(float_path).graph.node}


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_int8_refuses_engines_that_do_not_run_it(engine):
    with pytest.raises(ValueError, match="runs on ONNX Runtime"):
        PretrainedFeatures(TINY, weights=None, precision="int8", engine=engine, cache=None).fit(_images(2))


def test_int8_refuses_a_gpu_and_a_module_backbone():
    from skltransfer.engines import resolve_engine

    with pytest.raises(ValueError, match="on the CPU"):  # what device="cuda" meets on a GPU machine
        resolve_engine("auto", torch.device("cuda"), "int8")
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="named backbone"):
        PretrainedFeatures(module, precision="int8", cache=None).fit(_images(2))


def test_int8_without_onnxruntime_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[export\]\""):
        PretrainedFeatures(TINY, weights=None, precision="int8", cache=None).fit(_images(2))


def test_int8_calibration_skips_unreadable_images_and_transform_names_them(tmp_path):
    good = tmp_path / "good.png"
    from PIL import Image

    Image.fromarray(make_image(1, size=(64, 64))).save(good)
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not an image")
    features = PretrainedFeatures(TINY, weights=None, precision="int8", cache=None).fit([str(good), str(bad)])
    assert features.calibration_.images == 1
    with pytest.raises(skltransfer.ImageLoadError, match="corrupt.jpg"):
        features.transform([str(good), str(bad)])
    with pytest.raises(ValueError, match="none of the 1 sampled could be read"):
        PretrainedFeatures(TINY, weights=None, precision="int8", cache=None).fit([str(bad)])


def test_weight_width_follows_the_cpu_and_is_in_the_cache_key(image_folder, tmp_path, monkeypatch):
    paths, _ = load_image_folder(image_folder)
    features = PretrainedFeatures(TINY, weights=None, precision="int8", cache=tmp_path / "c").fit(paths)
    backbone = features._backbone(torch.device("cpu"), "onnxruntime", "int8")
    here = features._feature_config(backbone, "int8")
    assert here["int8_weights"] == (8 if full_range_int8() else 7)
    monkeypatch.setattr("skltransfer.features.full_range_int8", lambda: not full_range_int8())
    assert features._feature_config(backbone, "int8") != here


@pytest.mark.slow
def test_int8_default_backbone_keeps_the_frozen_pipeline_on_real_photos():
    root = requires_shared_data("hymenoptera")
    train, y_train = load_image_folder(root / "train")
    test, y_test = load_image_folder(root / "test")
    scores = {}
    for precision in ("float32", "int8"):
        clf = make_pipeline(PretrainedFeatures(precision=precision, cache=None), LogisticRegression(max_iter=1000))
        scores[precision] = clf.fit(train, y_train).score(test, y_test)
    assert scores["int8"] >= scores["float32"] - 0.02, scores
