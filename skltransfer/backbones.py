"""Resolving a backbone name and weights into a feature model.

One job: from ``(backbone, weights, pooling)`` build a :class:`Backbone`, an
``nn.Module`` that maps a normalised image batch to one feature row per
image, together with the preprocessing it expects and a digest of its
weights. Nothing here decodes images or batches data.

Backbones come from three places:

* a timm model name, pretrained tags included (``"resnet50.a1_in1k"``);
* ``"torchvision:<name>"`` for torchvision's classification models;
* an ``nn.Module`` the user built (used as given; 4-D outputs are pooled).

Weights are ``"pretrained"``, ``None`` (random initialisation, seeded so it
is the same in every process) or the path of a local state dict; loading and
fingerprinting them is :mod:`~skltransfer.weights`' job, pooling the maps
:mod:`~skltransfer.pooling`'s, sharing the built model
:mod:`~skltransfer.registry`'s.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from .pooling import (
    POOLINGS,
    TIMM_POOLINGS,
    TTA_MODES,
    feature_groups,
    FlipAveraged,
    LayerFeatures,
    output_width,
    PooledModule,
)
from .preprocessing import Preprocessing
from .weights import (
    TORCHVISION_PREFIX,
    WeightsSpec,
    download_timm,
    load_paired_in_order,
    load_state,
    packaged_weights_file,
    read_state_dict,
    unavailable_error,
    weights_digest,
)

__all__ = ["Backbone", "build_classifier_architecture", "load_backbone", "load_classifier"]

BackboneSpec = Union[str, nn.Module]


@dataclass(frozen=True)


class Backbone:
    """A ready feature extractor.

    Attributes
    ----------
    name : str
        The backbone as the user named it (or the module's class name).
    model : torch.nn.Module
        In eval mode, gradients off; maps a normalised ``(N, 3, H, W)`` float
        batch to ``(N, num_features)``.
    preprocessing : Preprocessing
        The resize, crop and normalisation the weights were trained with.
    num_features : int
        Width of one feature row.
    weights_digest : str
        Hex digest of every parameter and buffer: the weights' fingerprint.
    feature_groups : tuple of (str, int)
        Where the columns come from, in order: ``(("final", 1280),)`` for the
        default; one entry per layer with ``layers``.
    engine : {"torch", "openvino"}
        What runs ``model``: an ``nn.Module`` taking normalised float
        batches, or an :class:`~skltransfer.engines.OpenVINOModel` taking
        ``uint8`` batches (normalisation compiled in).
    """

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    num_features: int
    weights_digest: str
    feature_groups: tuple = ()
    engine: str = "torch"


def load_backbone(
    backbone: BackboneSpec,
    weights: WeightsSpec = "pretrained",
    pooling: str = "avg",
    *,
    layers: str | Sequence[int] = "final",
    tta: str | None = None,
    with_classifier: bool = False,
    input_size: int | tuple[int, int] | None = None,
) -> Backbone:
    """Build a backbone (no caching: see :func:`~skltransfer.registry.shared_backbone`).

    Parameters
    ----------
    backbone : str or torch.nn.Module
        A timm model name, ``"torchvision:<name>"``, or a module.
    weights : "pretrained", None or path
        Where the weights come from (ignored for a module, which keeps its own).
    pooling : {"avg", "max", "avgmax", "catavgmax", "gem"}
        Global pooling of each feature map (timm backbones and 4-D module
        outputs; torchvision backbones support ``"avg"`` only).
    layers : "final", "all" or list of int
        Which feature maps to pool and concatenate (timm backbones). The maps
        are the stage outputs followed by the final one (after the head
        convolution where the model has one): ``-1`` is the final map, ``-2``
        the last stage before it, ``"all"`` every stage and the final map.
    tta : None or "flip"
        ``"flip"`` averages the features of each image and its mirror image.
    with_classifier : bool
        Keep the ImageNet classifier (the model then outputs logits).
    input_size : None, int or (int, int)
        The size images are resized to (``None``: the size the weights were
        trained at); see :meth:`~skltransfer.preprocessing.Preprocessing.with_input_size`.

    Returns
    -------
    Backbone

    Examples
    --------
    >>> b = load_backbone("test_efficientnet", weights=None)
    >>> b.num_features, b.preprocessing.input_size
    (256, (160, 160))
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be None or 'flip', got {tta!r}")
    layers = _check_layers(layers)
    if isinstance(backbone, nn.Module):
        if layers != "final":
            raise ValueError("layers needs a timm backbone; a module backbone gives its own output")
        # A copy: the user's module (an estimator parameter) must not change.
        model = PooledModule(copy.deepcopy(backbone), pooling)
        name = type(backbone).__name__
        preprocessing = _timm_preprocessing(backbone)
    elif isinstance(backbone, str) and backbone.startswith(TORCHVISION_PREFIX):
        if layers != "final":
            raise ValueError("layers needs a timm backbone; torchvision backbones give their final features")
        name = backbone
        model, preprocessing = _build_torchvision(
            backbone[len(TORCHVISION_PREFIX) :], weights, pooling, with_classifier
        )
    elif isinstance(backbone, str):
        name = backbone
        model, preprocessing = _build_timm(backbone, weights, pooling, with_classifier, layers)
    else:
        raise TypeError(
            "backbone must be a timm model name, 'torchvision:<name>' or an "
            f"nn.Module, got {type(backbone).__name__}"
        )
    preprocessing = preprocessing.with_input_size(input_size)
    if tta == "flip":
        model = FlipAveraged(model)
    # channels_last: 2-3x faster convolutions on CPU (oneDNN) and on CUDA tensor cores.
    model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    num_features = output_width(model, preprocessing)
    groups = feature_groups(model, preprocessing) or (("final", num_features),)
    return Backbone(name, model, preprocessing, num_features, weights_digest(model), groups)


def _check_layers(layers: str | Sequence[int]) -> str | tuple[int, ...]:
    if isinstance(layers, str):
        if layers not in ("final", "all"):
            raise ValueError(f"layers must be 'final', 'all' or a list of ints, got {layers!r}")
        return layers
    try:
        chosen = tuple(int(i) for i in layers)
    except (TypeError, ValueError):
        raise ValueError(f"layers must be 'final', 'all' or a list of ints, got {layers!r}") from None
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must list distinct indices, got {layers!r}")
    return "final" if chosen == (-1,) else chosen


def load_classifier(
    backbone: str, weights: WeightsSpec = "pretrained", num_classes: int = 2, *, seed: int = 0
) -> tuple[nn.Module, Preprocessing, str]:
    """A pretrained backbone with a new, randomly initialised classifier, for fine-tuning.

    Returns the module (train-ready: gradients on), its preprocessing and the
    name of the classifier (the prefix of the head's parameter names).
    """
    if not isinstance(backbone, str):
        raise TypeError("fine-tuning needs a timm model name or 'torchvision:<name>'")
    if backbone.startswith(TORCHVISION_PREFIX):
        model, preprocessing = _build_torchvision(backbone[len(TORCHVISION_PREFIX):], weights, "avg", True)
        classifier = _last_linear_name(model)
        old = model.get_submodule(classifier)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.set_submodule(classifier, nn.Linear(old.in_features, num_classes))
    else:
        model, preprocessing = _build_timm(backbone, weights, "avg", True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.reset_classifier(num_classes)
        head = model.get_classifier()
        classifier = next(name for name, module in model.named_modules() if module is head)
    return model.requires_grad_(True), preprocessing, classifier


def build_classifier_architecture(backbone: str, num_classes: int) -> tuple[nn.Module, Preprocessing, str]:
    """The same architecture as :func:`load_classifier`, weights uninitialised (to load a state dict into)."""
    return load_classifier(backbone, None, num_classes)


# -- timm ---------------------------------------------------------------------


def _build_timm(
    name: str, weights: WeightsSpec, pooling: str, with_classifier: bool, layers="final"
) -> tuple[nn.Module, Preprocessing]:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown backbone {name!r}: not a timm model name.{hint} "
            f"torchvision models are named '{TORCHVISION_PREFIX}<name>'."
        )
    packaged = packaged_weights_file(name) if weights == "pretrained" else None
    if weights == "pretrained" and packaged is None:
        model = download_timm(name)
    else:
        model = _seeded(lambda: timm.create_model(name, pretrained=False))
        if packaged is not None:
            state = torch.load(packaged, map_location="cpu", weights_only=True)
            load_paired_in_order(model, state, packaged)
        elif weights is not None:
            classifier = model.pretrained_cfg.get("classifier") or "classifier"
            prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            load_state(model, read_state_dict(weights), weights, prefixes, with_classifier)
    preprocessing = _timm_preprocessing(model)
    if with_classifier:
        return model, preprocessing
    if layers == "final" and pooling in TIMM_POOLINGS:
        try:
            model.reset_classifier(0, global_pool=pooling)
        except (AssertionError, TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"backbone {name!r} does not support pooling={pooling!r}: {exc}") from None
        return model, preprocessing
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"backbone {name!r} has no forward_intermediates: layers and 'gem' need it")
    model.reset_classifier(0)
    return LayerFeatures(model, layers, pooling), preprocessing


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    from timm.data import resolve_model_data_config

    return Preprocessing.from_timm_config(resolve_model_data_config(model))


# -- torchvision ----------------------------------------------------------------


def _build_torchvision(
    name: str, weights: WeightsSpec, pooling: str, with_classifier: bool
) -> tuple[nn.Module, Preprocessing]:
    from torchvision import models

    available = models.list_models(module=models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f" Did you mean {', '.join(TORCHVISION_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"Unknown torchvision classification model {name!r}.{hint}")
    if pooling != "avg" and not with_classifier:
        raise ValueError(
            f"torchvision backbones use their own pooling; pooling must be 'avg', got {pooling!r}"
        )
    default_weights = models.get_model_weights(name).DEFAULT
    model = _seeded(lambda: models.get_model(name, weights=None))
    classifier = _last_linear_name(model)
    if weights == "pretrained":
        try:
            state = default_weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:
            raise unavailable_error(TORCHVISION_PREFIX + name, exc) from exc
        model.load_state_dict(state)
    elif weights is not None:
        load_state(model, read_state_dict(weights), weights, (classifier,), with_classifier)
    if not with_classifier:
        model.set_submodule(classifier, nn.Identity())
    return model, Preprocessing.from_torchvision_transforms(default_weights.transforms())


def _last_linear_name(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear classifier to remove")
    return names[-1]


# -- shared helpers -----------------------------------------------------------


def _seeded(build):
    """Build with a fixed seed, leaving the caller's random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()