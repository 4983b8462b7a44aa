"""Batch scoring: a bad file costs only itself; no good image goes through the model twice."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from torch import nn

from _support import TINY
from skltransfer import FineTuneClassifier, PretrainedFeatures, load_image_folder
from skltransfer.scoring import extract_chunk, score_chunk


class CountingModule(nn.Module):
    """Counts the images that go through it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU())
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.body(x)


def test_a_bad_file_in_a_chunk_costs_no_second_pass_over_the_good_ones(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    clf = make_pipeline(PretrainedFeatures(CountingModule(), cache=None), LogisticRegression()).fit(paths, labels)
    counter = clf[0]._backbone(torch.device("cpu")).model.module  # the shared copy that runs
    before = counter.seen
    rows = score_chunk(clf, paths + [str(tmp_path / "missing.jpg")])
    assert counter.seen - before == len(paths)  # each good image once, none again after the error
    assert rows[-1]["error"] == "no such file"
    expected = clf.predict_proba(paths)
    np.testing.assert_allclose([r["probability"] for r in rows[:-1]], expected.max(axis=1), rtol=1e-6)
    before = counter.seen
    features, good, errors = extract_chunk(clf[0], [str(tmp_path / "missing.jpg")] + paths)
    assert counter.seen - before == len(paths) and good == list(range(1, len(paths) + 1))
    np.testing.assert_allclose(features, clf[0].transform(paths), rtol=1e-6)


def test_a_finetuned_classifier_scores_a_chunk_with_a_bad_file_in_one_pass(image_folder, tmp_path, monkeypatch):
    paths, labels = load_image_folder(image_folder)
    clf = FineTuneClassifier(TINY, weights=None, epochs=1, engine="torch", random_state=0).fit(paths, labels)
    expected = clf.predict_proba(paths)
    calls = []
    real = FineTuneClassifier._logits
    monkeypatch.setattr(FineTuneClassifier, "_logits", lambda self, X: calls.append(len(X)) or real(self, X))
    rows = score_chunk(clf, [str(tmp_path / "gone.png")] + paths, top_k=2)
    assert calls == [len(paths) + 1]
    assert rows[0]["error"] == "no such file"
    np.testing.assert_allclose([r["probability"] for r in rows[1:]], expected.max(axis=1), rtol=1e-6)
