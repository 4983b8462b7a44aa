"""The process-wide model registry: every model that runs inference, made once.

One job: hold the inference models of a process. A feature model is built
once per configuration and handed to every estimator that asks
(``GridSearchCV`` clones, unpickled copies); a fine-tuned classifier gets one
inference copy per device and engine, kept as long as the classifier lives.
Both have BatchNorm folded (:mod:`~skltransfer.fusion`) and, for the
OpenVINO engine, are compiled (:mod:`~skltransfer.engines`). Nothing here
builds a model itself: :func:`~skltransfer.backbones.load_backbone` does.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, BackboneSpec, load_backbone
from .fusion import fold_batchnorm
from .pooling import FlipAveraged
from .preprocessing import check_input_size
from .weights import WeightsSpec, weights_digest

__all__ = ["clear_shared_backbones", "forget_inference_copies", "inference_copy", "model_identity", "shared_backbone"]


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
    input_size: int | tuple[int, int] | None = None,
    calibration=None,
) -> Backbone:
    """Return the process-wide :class:`~skltransfer.backbones.Backbone` for a configuration, building it once.

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

    With ``engine="onnxruntime"`` (int8, CPU only) the model is the int8
    network quantised with ``calibration``
    (:func:`skltransfer.quantization.compile_int8`), kept in ``engine_dir``.

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
    size_key = None if input_size is None else check_input_size(input_size)
    cpu_key = spec + (pooling, layers_key, tta, size_key, "cpu")
    if engine == "openvino":
        key = cpu_key + ("openvino", precision)  # wherever its conversion is kept, the same model
    elif engine == "onnxruntime":
        key = cpu_key + ("int8", calibration.digest)
    else:
        key = cpu_key[:-1] + (str(device),)
    table = _SHARED
    with _SHARED_LOCK:
        if key in table:
            table.move_to_end(key)
            return table[key]
        base = table.get(cpu_key)
        if base is None:
            base = load_backbone(backbone, weights, pooling, layers=layers, tta=tta, input_size=input_size)
            # Registry models only ever compute features: fold BatchNorm into
            # the convolutions (the digest above is of the weights as loaded).
            # Not a user's module: tracing would run its forward, side effects and all.
            if not isinstance(backbone, nn.Module):
                fold_batchnorm(base.model)
            _remember(table, cpu_key, base)
        if engine == "openvino":
            identity = None if isinstance(backbone, nn.Module) else model_identity(base, pooling, layers, tta)
            compiled = _compiled(base, precision, identity, engine_dir)
            _remember(table, key, compiled)
            return compiled
        if engine == "onnxruntime":
            int8 = _int8(base, calibration, model_identity(base, pooling, layers, tta), engine_dir)
            _remember(table, key, int8)
            return int8
        if str(device) == "cpu":
            return base
        moved = dataclasses.replace(base, model=copy.deepcopy(base.model).to(device))
        _remember(table, key, moved)
        return moved


def model_identity(base: Backbone, pooling: str, layers, tta) -> dict[str, Any]:
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


def _int8(base: Backbone, calibration, identity, engine_dir) -> Backbone:
    from .quantization import compile_int8

    model = compile_int8(base.model, base.preprocessing, calibration, description=f"backbone {base.name!r}",
                         identity=identity, directory=engine_dir)
    return dataclasses.replace(base, model=model, engine="onnxruntime")


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


# -- inference copies of models that are still trained (fine-tuned classifiers) --------

# model -> {device: its folded copy there}; an entry goes when its model does.
_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


def inference_copy(
    model: nn.Module,
    device: str | torch.device = "cpu",
    *,
    engine: str = "torch",
    preprocessing=None,
    engine_dir: str | os.PathLike | None = None,
    tta: str | None = None,
):
    """A folded, eval-mode, gradient-free copy of ``model`` on ``device``, made once.

    For a model that is still trained between predictions (a fine-tuned
    classifier): ``model`` itself is left as it is, and the copy is kept for
    as long as ``model`` lives, so repeated predictions pay for the copy and
    the fold once. The copy holds the weights ``model`` had when it was made:
    after changing them, call :func:`forget_inference_copies`.

    Parameters
    ----------
    model : torch.nn.Module
        The source model; it may be in training mode.
    device : str or torch.device
        Where the copy lives.
    engine : {"torch", "openvino"}
        ``"openvino"``: the folded copy compiled by OpenVINO for the CPU
        (:func:`skltransfer.engines.compile_openvino`; needs
        ``preprocessing``), its conversion kept in ``engine_dir`` under a
        digest of the weights. A model that does not convert gives the
        torch copy, after one :class:`~skltransfer.engines.EngineFallbackWarning`.
    preprocessing : Preprocessing, optional
        The model's input size and normalisation (for ``engine="openvino"``).
    engine_dir : path, optional
        Where OpenVINO conversions are kept.
    tta : None or "flip"
        ``"flip"``: the copy averages the outputs of each image and its mirror.

    Returns
    -------
    torch.nn.Module or skltransfer.engines.OpenVINOModel

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    >>> fast = inference_copy(net)
    >>> type(fast[1]).__name__, type(net[1]).__name__
    ('Identity', 'BatchNorm2d')
    >>> inference_copy(net) is fast
    True
    """
    if tta not in (None, "flip"):
        raise ValueError(f"tta must be None or 'flip', got {tta!r}")
    key = (str(torch.device(device)), engine, tta)
    with _COPIES_LOCK:
        copies = _COPIES.setdefault(model, {})
        if key not in copies:
            if engine == "openvino":
                folded = _torch_copy(model, "cpu", tta, copies)
                copies[key] = _compiled_copy(model, folded, preprocessing, engine_dir, tta)
            else:
                _torch_copy(model, device, tta, copies)
        return copies[key]


def _torch_copy(model: nn.Module, device, tta: str | None, copies: dict) -> nn.Module:
    key = (str(torch.device(device)), "torch", tta)
    if key not in copies:
        fast = copy.deepcopy(model).eval().requires_grad_(False)
        fold_batchnorm(fast)
        copies[key] = (FlipAveraged(fast) if tta == "flip" else fast).to(device)
    return copies[key]


def _compiled_copy(model: nn.Module, folded: nn.Module, preprocessing, engine_dir, tta: str | None):
    from .engines import compile_openvino_or_warn

    identity = {"fine-tuned": weights_digest(model), "architecture": type(model).__name__,
                "input_size": list(preprocessing.input_size), "mean": list(preprocessing.mean),
                "std": list(preprocessing.std), **({"tta": tta} if tta else {})}
    compiled = compile_openvino_or_warn(folded, preprocessing, f"the fine-tuned {type(model).__name__}",
                                        identity=identity, directory=engine_dir)
    return folded if compiled is None else compiled


def forget_inference_copies(model: nn.Module) -> None:
    """Drop the copies :func:`inference_copy` made of ``model`` (call after changing its weights)."""
    with _COPIES_LOCK:
        _COPIES.pop(model, None)
