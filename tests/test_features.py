"""PretrainedFeatures: inputs, outputs, pipelines, persistence and errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline

from _support import TINY, encode, make_image
from skltransfer import (
    ImageLoadError,
    PretrainedFeatures,
    WeightsMismatchError,
    load_image_folder,
    registry,
)


def tiny(**params) -> PretrainedFeatures:
    """The tiny backbone, uncached: every transform really runs the model."""
    return PretrainedFeatures(**{"backbone": TINY, "weights": None, "cache": None, **params})


def test_each_input_kind_gives_the_same_features(tmp_path):
    pixels = [make_image(seed=s, size=(36, 52)) for s in range(3)]
    paths = []
    for i, p in enumerate(pixels):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode(p, "PNG"))
    f = tiny().fit(paths)
    expected = f.transform([str(p) for p in paths])
    variants = {
        "pathlib": paths,
        "tuple": tuple(str(p) for p in paths),
        "object array": np.array([str(p) for p in paths], dtype=object),
        "bytes": [p.read_bytes() for p in paths],
        "PIL": [Image.open(p) for p in paths],
        "arrays": pixels,
        "stacked array": np.stack(pixels),
    }
    for name, X in variants.items():
        np.testing.assert_allclose(f.transform(X), expected, rtol=0, atol=1e-5, err_msg=name)


def test_a_pandas_series_of_paths_is_accepted(image_folder):
    pd = pytest.importorskip("pandas")
    paths, _ = load_image_folder(image_folder)
    f = tiny().fit(paths)
    np.testing.assert_allclose(f.transform(pd.Series(paths)), f.transform(paths), atol=1e-6)


def test_output_is_float32_one_row_per_image_and_batch_size_does_not_matter(image_folder):
    paths, _ = load_image_folder(image_folder)
    one = tiny(batch_size=1).fit_transform(paths)
    many = tiny(batch_size=7).fit_transform(paths)
    assert one.dtype == np.float32 and one.shape == (len(paths), 256)
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert np.isfinite(one).all() and one.std() > 0


def test_feature_names_and_pandas_output(image_folder):
    pd = pytest.importorskip("pandas")
    paths, _ = load_image_folder(image_folder)
    f = tiny().fit(paths)
    names = f.get_feature_names_out()
    assert len(names) == 256 and names[0] == "pretrainedfeatures0"
    frame = f.set_output(transform="pandas").transform(paths[:3])
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(names)


def test_clone_keeps_parameters_and_not_fitted_state(image_folder):
    paths, _ = load_image_folder(image_folder)
    f = tiny(pooling="max", batch_size=4).fit(paths)
    c = clone(f)
    assert c.get_params() == f.get_params()
    assert not hasattr(c, "backbone_digest_")
    assert c.set_params(pooling="avg").pooling == "avg"


def test_pipeline_learns_separable_classes(image_folder):
    paths, labels = load_image_folder(image_folder)
    clf = make_pipeline(tiny(), LogisticRegression(max_iter=1000)).fit(paths, labels)
    assert clf.score(paths, labels) == 1.0


def test_gridsearch_over_two_heads_builds_the_backbone_once(image_folder, monkeypatch):
    built = []
    real = registry.load_backbone
    monkeypatch.setattr(registry, "load_backbone", lambda *a, **k: built.append(a) or real(*a, **k))
    paths, labels = load_image_folder(image_folder)
    pipe = Pipeline([("features", tiny()), ("clf", LogisticRegression())])
    grid = GridSearchCV(
        pipe, {"clf": [LogisticRegression(max_iter=500), KNeighborsClassifier(3)]}, cv=3
    ).fit(paths, labels)
    assert grid.best_score_ > 0.9
    assert len(built) == 1  # 2 heads x 3 folds + the refit: one construction


def test_joblib_round_trip_in_a_fresh_process_predicts_identically(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    clf = make_pipeline(PretrainedFeatures(), LogisticRegression(max_iter=1000)).fit(paths, labels)
    model_file = tmp_path / "model.joblib"
    joblib.dump(clf, model_file)
    assert model_file.stat().st_size < 1_000_000  # configuration and fingerprint, no weights
    script = textwrap.dedent(
        f"""
        import json, sys, joblib
        clf = joblib.load({str(model_file)!r})
        paths = json.loads(sys.stdin.read())
        print(json.dumps([clf.predict(paths).tolist(), clf.predict_proba(paths).tolist()]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(paths), capture_output=True, text=True, check=True
    )
    labels_there, proba_there = json.loads(done.stdout)
    assert labels_there == clf.predict(paths).tolist()
    # Same weights, same numbers up to float32 summation order (thread counts differ between processes).
    np.testing.assert_allclose(np.array(proba_there), clf.predict_proba(paths), rtol=0, atol=1e-6)


def test_changed_weights_behind_the_same_name_are_an_error(image_folder, tmp_path):
    import timm

    paths, _ = load_image_folder(image_folder)
    weights = tmp_path / "weights.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model(TINY).state_dict(), weights)
    fitted = PretrainedFeatures(TINY, weights=weights).fit(paths)
    restored = pickle.loads(pickle.dumps(fitted))
    torch.manual_seed(2)
    torch.save(timm.create_model(TINY).state_dict(), weights)  # new weights, same file
    with pytest.raises(WeightsMismatchError, match="fingerprint"):
        restored.transform(paths[:2])


def test_pickled_estimator_rebuilds_the_backbone_and_agrees(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    f = tiny().fit(paths)
    expected = f.transform(paths)
    joblib.dump(f, tmp_path / "f.joblib")
    registry.clear_shared_backbones()
    np.testing.assert_array_equal(joblib.load(tmp_path / "f.joblib").transform(paths), expected)


def test_a_module_backbone_works_in_a_pipeline_and_pickles(image_folder, tmp_path):
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3))
    paths, labels = load_image_folder(image_folder)
    clf = make_pipeline(PretrainedFeatures(module), LogisticRegression(max_iter=1000)).fit(paths, labels)
    joblib.dump(clf, tmp_path / "m.joblib")
    np.testing.assert_allclose(joblib.load(tmp_path / "m.joblib").predict_proba(paths), clf.predict_proba(paths), atol=1e-6)


def test_several_bad_images_are_listed_in_one_error(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    good = paths[0]
    X = [good, str(tmp_path / "missing.jpg"), str(empty), good, str(text)]
    f = tiny(batch_size=2).fit(X)
    with pytest.raises(ImageLoadError) as info:
        f.transform(X)
    failures = info.value.failures
    assert [x.index for x in failures] == [1, 2, 4]
    message = str(info.value)
    for name in ("missing.jpg", "empty.jpg", "text.jpg"):
        assert name in message
    assert "3 images could not be read" in message


@pytest.mark.parametrize(
    "params, message",
    [({"pooling": "median"}, "pooling"), ({"batch_size": 0}, "batch_size"),
     ({"device": "tpu"}, "device"), ({"backbone": 3}, "backbone"), ({"precision": "int4"}, "precision"),
     ({"input_size": 16}, "input_size"), ({"input_size": (64, 8)}, "input_size"),
     ({"input_size": (64, 64, 3)}, "input_size")],
)
def test_invalid_parameters_are_refused_at_fit(image_folder, params, message):
    paths, _ = load_image_folder(image_folder)
    f = tiny(**params)  # __init__ stores, never validates
    with pytest.raises((ValueError, TypeError), match=message):
        f.fit(paths)


def test_input_size_is_the_size_the_network_sees():
    from skltransfer.backbones import load_backbone

    images = np.stack([make_image(seed=s, size=(96, 96)) for s in range(3)])
    f = tiny(input_size=96, crop="none").fit(images)
    assert f.preprocessing_.input_size == (96, 96)
    # 96 x 96 images at input_size 96 reach the network as they are: no resize.
    b = load_backbone(TINY, weights=None)
    pixels = b.preprocessing.normalize(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    with torch.no_grad():
        expected = b.model(pixels).numpy()
    np.testing.assert_allclose(f.transform(images), expected, rtol=1e-4, atol=1e-5)
    default = tiny(crop="none").fit(images)
    assert default.preprocessing_.input_size == (160, 160)  # the weights' own size
    assert not np.allclose(default.transform(images), expected, atol=1e-3)


def test_empty_input_is_refused(image_folder):
    with pytest.raises(ValueError, match="0 sample"):
        tiny().fit([])


def test_only_torch_on_the_cpu_changes_the_allocator(tmp_path):
    """OpenVINO (the CPU's default engine) leaves glibc's settings alone; torch's CPU work tunes them."""
    import platform

    script = (
        "import numpy as np\n"
        "from skltransfer import PretrainedFeatures, runtime\n"
        f"X = np.zeros((2, 40, 40, 3), np.uint8)\n"
        f"PretrainedFeatures({TINY!r}, weights=None, engine='openvino', cache=None).fit(X).transform(X)\n"
        "print(runtime._ALLOCATOR_TUNED)\n"
        f"PretrainedFeatures({TINY!r}, weights=None, engine='torch', cache=None).fit(X).transform(X)\n"
        "print(runtime._ALLOCATOR_TUNED)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert done.stdout.split() == ["False", str(glibc)]


def test_allocator_tuning_can_be_turned_off(monkeypatch):
    from skltransfer import runtime as inference

    monkeypatch.setattr(inference, "_ALLOCATOR_TUNED", False)
    monkeypatch.setenv(inference.TUNING_ENV, "0")
    assert inference.tune_allocator() is False
    monkeypatch.delenv(inference.TUNING_ENV)
    import platform

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert inference.tune_allocator() is expected


class _RunsOutOfMemory(torch.nn.Module):
    """A backbone that 'runs out of memory' above 2 images per forward pass."""

    calls: list = []

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=8)

    def forward(self, x):
        _RunsOutOfMemory.calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return self.conv(x)


def test_out_of_memory_halves_the_batch_and_never_crashes(image_folder):
    paths, _ = load_image_folder(image_folder)
    _RunsOutOfMemory.calls.clear()
    f = PretrainedFeatures(_RunsOutOfMemory(), batch_size=8, cache=None).fit(paths)
    _RunsOutOfMemory.calls.clear()
    halved = f.transform(paths)
    # 8 fails, 4 fails, then slices of 2 for the rest of the call (no retry at 8 per batch)
    assert _RunsOutOfMemory.calls[:3] == [8, 4, 2] and max(_RunsOutOfMemory.calls[2:]) == 2
    expected = PretrainedFeatures(_RunsOutOfMemory(), batch_size=2, cache=None).fit(paths).transform(paths)
    np.testing.assert_allclose(halved, expected, atol=1e-6)
