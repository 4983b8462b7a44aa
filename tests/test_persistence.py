"""The safe model format: fitted models round-trip, and nothing in a file runs on load."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from _support import TINY
from skltransfer import FineTuneClassifier, PretrainedFeatures, UnsafeModelError, load, load_image_folder, save
from skltransfer.cli import main


def _pipeline(paths, labels, **params):
    params.setdefault("cache", None)
    features = PretrainedFeatures(TINY, weights=None, **params)
    return make_pipeline(features, StandardScaler(), LogisticRegression(max_iter=500)).fit(paths, labels)


def test_a_feature_pipeline_round_trips_and_predicts_identically(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    clf = _pipeline(paths, labels, layers=[-2, -1], crop="pad", cache=tmp_path / "c")
    save(clf, tmp_path / "model.skops")
    loaded = load(tmp_path / "model.skops")
    np.testing.assert_array_equal(loaded.predict_proba(paths), clf.predict_proba(paths))
    assert loaded.get_params()["pretrainedfeatures__layers"] == [-2, -1]


def test_a_finetuned_classifier_round_trips_with_its_weights(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    clf = FineTuneClassifier(TINY, weights=None, epochs=1, engine="torch", random_state=0).fit(paths, labels)
    save(clf, tmp_path / "ft.skops")
    loaded = load(tmp_path / "ft.skops")
    np.testing.assert_allclose(loaded.predict_proba(paths), clf.predict_proba(paths), rtol=1e-6)
    assert list(loaded.classes_) == list(clf.classes_)


def test_what_the_format_cannot_hold_is_refused_at_save_naming_the_parameter(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    clf = make_pipeline(PretrainedFeatures(module, cache=None), LogisticRegression()).fit(paths, labels)
    with pytest.raises(UnsafeModelError, match="pretrainedfeatures__backbone is an nn.Module.*joblib"):
        save(clf, tmp_path / "m.skops")
    tuned = FineTuneClassifier(TINY, weights=None, epochs=0, augment=lambda x: x).fit(paths, labels)
    with pytest.raises(UnsafeModelError, match="augment is a callable"):
        save(tuned, tmp_path / "ft.skops")
    assert not list(tmp_path.glob("*.skops*"))  # nothing half-written


class _RunsACommand:
    """What a malicious pickle holds: unpickling it calls os.system."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_is_refused_and_its_payload_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.skops").write_bytes(pickle.dumps(_RunsACommand()))
    with pytest.raises(UnsafeModelError, match="not a model written by skltransfer.save.*trust"):
        load(tmp_path / "model.skops")
    assert not (tmp_path / "PWNED").exists()


def test_a_tampered_archive_naming_a_function_is_refused_listing_it(image_folder, tmp_path, monkeypatch):
    import skops.io as sio

    monkeypatch.chdir(tmp_path)
    paths, labels = load_image_folder(image_folder)
    clf = _pipeline(paths, labels)
    tampered = make_pipeline(clf, LogisticRegression())  # a valid model ...
    tampered.steps[1] = ("hook", os.system)  # ... with a function slipped in
    (tmp_path / "evil.skops").write_bytes(sio.dumps(tampered))
    with pytest.raises(UnsafeModelError, match="refused.*system.*Nothing from it was built"):
        load(tmp_path / "evil.skops")
    assert zipfile.is_zipfile(tmp_path / "evil.skops")


def test_the_cli_trains_to_and_predicts_from_the_safe_format(image_folder, tmp_path):
    out = tmp_path / "model.skops"
    assert main(["train", str(image_folder), "--backbone", TINY, "--weights", "none", "--out", str(out),
                 "--no-cache", "--quiet"]) == 0
    assert zipfile.is_zipfile(out)
    predictions = tmp_path / "p.csv"
    assert main(["predict", str(out), str(image_folder), "--no-cache", "--quiet", "--out", str(predictions)]) == 0
    assert len(predictions.read_text().strip().splitlines()) == 1 + 16  # header + one row per image
