"""The CUDA path. Runs where a GPU is present, skips elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skltransfer import PretrainedFeatures, load_image_folder
from skltransfer.runtime import resolve_batch_size, resolve_precision

from _support import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_cuda_defaults_are_16_bit_and_large_batches():
    device = torch.device("cuda")
    assert resolve_precision("auto", device) in ("bfloat16", "float16")
    assert resolve_batch_size("auto", device) == 64


@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_cuda_features_agree_with_cpu_features(image_folder, precision):
    paths, _ = load_image_folder(image_folder)
    cpu = PretrainedFeatures(TINY, weights=None, device="cpu", cache=None).fit_transform(paths)
    gpu = PretrainedFeatures(TINY, weights=None, device="cuda", precision=precision, cache=None).fit_transform(paths)
    assert gpu.dtype == np.float32
    assert _cosine(gpu, cpu).min() > (0.99 if precision == "auto" else 0.9999)


def test_a_model_fitted_on_cuda_transforms_on_cpu(image_folder):
    import pickle

    paths, _ = load_image_folder(image_folder)
    fitted = PretrainedFeatures(TINY, weights=None, device="auto", cache=None).fit(paths)
    on_gpu = fitted.transform(paths)
    moved = pickle.loads(pickle.dumps(fitted)).set_params(device="cpu")
    assert _cosine(moved.transform(paths), on_gpu).min() > 0.99


@pytest.mark.parametrize("params", [{}, {"ema_epochs": 1.0}], ids=["plain", "ema"])
def test_a_classifier_fine_tuned_on_cuda_scores_on_a_cpu_only_machine(image_folder, tmp_path, params):
    import skltransfer
    from skltransfer import FineTuneClassifier

    paths, y = load_image_folder(image_folder)
    clf = FineTuneClassifier(TINY, weights=None, epochs=2, batch_size=4, early_stopping=False, random_state=0,
                             device="cuda", cache=None, **params).fit(paths, y)
    assert clf.history_[-1]["images_per_second"] > 0
    on_gpu = clf.predict_proba(paths)  # 16-bit autocast on the GPU
    skltransfer.save(clf, tmp_path / "model.skops")
    on_cpu = skltransfer.load(tmp_path / "model.skops").set_params(device="cpu").predict_proba(paths)
    np.testing.assert_allclose(on_cpu, on_gpu, atol=0.02)
    assert (on_cpu.argmax(1) == on_gpu.argmax(1)).mean() >= 0.9
