"""scikit-learn's own estimator checks, run on PretrainedFeatures and FineTuneClassifier.

scikit-learn's checks feed numeric tables (``make_blobs`` and friends) and
skip every check for an estimator whose tags say it takes no 2-D arrays, as
ours honestly do. So that the checks still exercise the real ``fit`` and
``transform`` (cloning, pickling, idempotence, subset and order invariance,
set_output, unfitted errors, ...), they run on ``TableAsImages``: the same
estimator, whose only addition is to draw each row of a numeric table as a
1 x n_features grayscale image (``TableAsImagesClassifier`` likewise for
the classifier, a tiny random-weight network trained for one epoch). The
checks that cannot hold for an image estimator are listed with the reason.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_array
from sklearn.utils.estimator_checks import parametrize_with_checks

from _support import TINY
from skltransfer import FineTuneClassifier, PretrainedFeatures


def _table_to_images(X):
    X = check_array(X, dtype=np.float64)  # NaN, inf, sparse, empty: sklearn's own errors
    pixels = np.clip(np.round(X * 32.0 + 128.0), 0, 255).astype(np.uint8)
    return pixels[:, None, :]  # (n_samples, 1, n_features): one grayscale image per row


class _TablesOnly:
    """Tags of an adapter that takes tables, and only tables."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.input_tags.one_d_array = False
        tags.input_tags.three_d_array = False
        tags.input_tags.string = False
        return tags


class TableAsImages(_TablesOnly, PretrainedFeatures):
    """PretrainedFeatures that accepts numeric tables, drawn as 1-pixel-high images."""

    def fit(self, X, y=None):
        return super().fit(_table_to_images(X), y)

    def transform(self, X):
        return super().transform(_table_to_images(X))


_ANY_IMAGE_SIZE = (
    "images of any size are valid input, so there is no fixed number of input "
    "features: no n_features_in_, and no error when the 'number of features' "
    "(here: the image width) differs between fit and transform"
)
EXPECTED_FAILURES = {
    "check_n_features_in": _ANY_IMAGE_SIZE,
    "check_n_features_in_after_fitting": _ANY_IMAGE_SIZE,
    # Passes every other assertion (fit_transform == fit().transform(), shapes,
    # fitting twice) and fails only on the n_features mismatch error.
    "check_transformer_general": _ANY_IMAGE_SIZE,
    "check_transformer_general(readonly_memmap=True)": _ANY_IMAGE_SIZE,
    "check_dict_unchanged": (
        "transform records cache_info_ (hits, misses and seconds of that call): "
        "observability asked for by users, not learned state"
    ),
}


class TableAsImagesClassifier(_TablesOnly, FineTuneClassifier):
    """FineTuneClassifier that accepts numeric tables, drawn as 1-pixel-high images."""

    def fit(self, X, y):
        return super().fit(_table_to_images(X), y)

    def predict(self, X):
        return super().predict(_table_to_images(X))

    def predict_proba(self, X):
        return super().predict_proba(_table_to_images(X))

    def decision_function(self, X):
        return super().decision_function(_table_to_images(X))


_LEARNS_FROM_IMAGES = (
    "a random-weight network trained for one epoch on a few dozen 1-pixel-high drawings of "
    "table rows does not reach the check's accuracy threshold; learning is tested on images in "
    "test_finetune.py"
)
EXPECTED_CLASSIFIER_FAILURES = {
    "check_n_features_in": _ANY_IMAGE_SIZE,
    "check_n_features_in_after_fitting": _ANY_IMAGE_SIZE,
    # Fails on the training-accuracy threshold: the probe's features of 1-pixel-high drawings of
    # table rows, from a random-weight network, do not separate them well enough.
    "check_classifiers_train": _LEARNS_FROM_IMAGES,
    "check_classifiers_train(readonly_memmap=True)": _LEARNS_FROM_IMAGES,
    "check_classifiers_train(readonly_memmap=True,X_dtype=float32)": _LEARNS_FROM_IMAGES,
    # check_class_weight_classifiers passes since the head starts as a (class-weighted) linear probe.
}


def expected_failures(estimator):
    return EXPECTED_CLASSIFIER_FAILURES if isinstance(estimator, FineTuneClassifier) else EXPECTED_FAILURES


@parametrize_with_checks(
    [
        TableAsImages(backbone=TINY, weights=None),
        TableAsImagesClassifier(backbone=TINY, weights=None, epochs=1, engine="torch", random_state=0),
    ],
    expected_failed_checks=expected_failures,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_tags_declare_image_input():
    tags = PretrainedFeatures().__sklearn_tags__()
    assert not tags.input_tags.two_d_array
    assert tags.input_tags.string and tags.input_tags.one_d_array and tags.input_tags.three_d_array
    assert tags.requires_fit and not tags.target_tags.required


def test_init_stores_parameters_only():
    f = PretrainedFeatures(backbone="not-validated-yet", batch_size=-1)
    assert f.get_params()["backbone"] == "not-validated-yet"
    assert not [k for k in vars(f) if k.endswith("_")]
