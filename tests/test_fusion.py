"""BatchNorm folding: faster inference models that compute the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from skltransfer import PretrainedFeatures
from skltransfer.backbones import load_backbone
from skltransfer.registry import shared_backbone
from skltransfer.fusion import fold_batchnorm
from skltransfer.registry import forget_inference_copies, inference_copy

from _support import TINY, make_image


def _randomise_statistics(model: nn.Module) -> None:
    """Fresh models have mean 0 / var 1 statistics, which fold to nothing: make them matter."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(shape, generator=generator) - 0.5)


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(module, nn.BatchNorm2d) for module in model.modules())


@pytest.mark.parametrize("name", [TINY, "torchvision:mobilenet_v3_small"])
@pytest.mark.parametrize("tta", [None, "flip"])
def test_folding_removes_every_batchnorm_and_keeps_the_outputs(name, tta):
    model = load_backbone(name, weights=None, tta=tta).model
    _randomise_statistics(model)
    x = torch.randn(2, 3, 160, 160).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        before = model(x)
    n_norms = _batchnorms(model)

    assert fold_batchnorm(model) == n_norms > 0
    assert _batchnorms(model) == 0
    with torch.inference_mode():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_batchnorm_after_a_convolution_read_twice_is_kept():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.norm(y) + y  # folding would change the second reader of y

    model = Residual().eval()
    _randomise_statistics(model)
    x = torch.randn(1, 4, 8, 8)
    before = model(x)
    assert fold_batchnorm(model) == 0
    torch.testing.assert_close(model(x), before)


def test_folding_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))


def test_feature_model_is_folded_and_computes_the_features_of_the_model_as_loaded():
    loaded = load_backbone(TINY, weights=None)
    shared = shared_backbone(TINY, weights=None)
    assert _batchnorms(loaded.model) > 0 and _batchnorms(shared.model) == 0
    assert shared.weights_digest == loaded.weights_digest  # the fingerprint is of the loaded weights

    images = [make_image(seed, size=(160, 160)) for seed in range(3)]
    features = PretrainedFeatures(TINY, weights=None, cache=None).fit_transform(images)
    pixels = torch.stack([loaded.preprocessing.resize_crop(torch.from_numpy(i).permute(2, 0, 1)) for i in images])
    with torch.inference_mode():
        reference = loaded.model(loaded.preprocessing.normalize(pixels)).numpy()
    cosine = (features * reference).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() > 0.99999


def test_inference_copy_is_folded_made_once_and_leaves_the_source_alone():
    source = load_backbone(TINY, weights=None).model
    _randomise_statistics(source)
    source.train()  # a model still being trained, as FineTuneClassifier's is between fits
    n_norms = _batchnorms(source)
    x = torch.randn(2, 3, 160, 160)

    fast = inference_copy(source)
    assert fast is inference_copy(source) and fast is not source
    assert _batchnorms(fast) == 0 and not fast.training
    assert source.training and _batchnorms(source) == n_norms
    with torch.inference_mode():
        expected = source.eval()(x)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    # New weights: the old copy is stale until forgotten, then a fresh one has them.
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.mul_(0.5)
    forget_inference_copies(source)
    fresh = inference_copy(source)
    assert fresh is not fast
    with torch.inference_mode():
        expected = source(x)
        torch.testing.assert_close(fresh(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
