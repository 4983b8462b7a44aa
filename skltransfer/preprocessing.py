"""Resolved preprocessing: from a model's data config to pixels it can eat.

One job: hold the exact resize / crop / normalisation a backbone expects and
apply it. Resizing and cropping run on ``uint8`` tensors (cheap to move
between processes); normalisation runs once per collated batch, on the
device that runs the model.

The geometry follows timm's eval transform (``timm.data.transforms_factory.
transforms_imagenet_eval``): ``scale_size = floor(input_size / crop_pct)``,
then a centre crop, with timm's ``center``, ``squash`` and ``border`` crop
modes. torchvision weights map onto the same description.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = ["CROP_POLICIES", "Preprocessing"]

#: ``crop`` policies: ``"center"`` the model's own resize + centre crop;
#: ``"none"`` resize straight to the input size (nothing cut, aspect not kept);
#: ``"pad"`` resize the long side and pad (letterbox, aspect kept);
#: ``"auto"`` ``"none"`` for an image smaller than the input on both sides
#: (a 32 px CIFAR image has no border to spare), ``"center"`` otherwise.
CROP_POLICIES = ("auto", "center", "none", "pad")

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB pixels become a backbone's input tensor.

    Parameters
    ----------
    input_size : (int, int)
        Height and width the model sees.
    crop_pct : float
        Fraction of the resized image kept by the centre crop (timm's
        meaning: the image is first resized to ``input_size / crop_pct``).
    crop_mode : {"center", "squash", "border"}
        ``"center"`` resizes the short side and crops the centre;
        ``"squash"`` resizes both sides (aspect not kept) then crops;
        ``"border"`` resizes the long side and pads.
    interpolation : {"bilinear", "bicubic", "nearest"}
    mean, std : tuple of float
        Per-channel normalisation on pixels scaled to [0, 1].
    crop : {"center", "auto", "none", "pad"}
        The resizing policy (see ``CROP_POLICIES``); ``"center"`` follows
        ``crop_pct`` and ``crop_mode`` exactly as timm's eval transform.

    Examples
    --------
    >>> p = Preprocessing((224, 224), 0.875, "center", "bicubic", (0.5,) * 3, (0.5,) * 3)
    >>> import torch
    >>> p.resize_crop(torch.zeros(3, 375, 500, dtype=torch.uint8)).shape
    torch.Size([3, 224, 224])
    """

    input_size: tuple[int, int]
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: str = "center"

    def __post_init__(self):
        if self.crop not in CROP_POLICIES:
            raise ValueError(f"crop must be one of {CROP_POLICIES}, got {self.crop!r}")
        if self.crop_mode not in ("center", "squash", "border"):
            raise ValueError(f"unknown crop_mode {self.crop_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")

    @classmethod
    def from_timm_config(cls, config: dict[str, Any]) -> "Preprocessing":
        """Build from a timm data config (``timm.data.resolve_model_data_config``)."""
        _, height, width = config["input_size"]
        interpolation = config.get("interpolation", "bicubic")
        if interpolation not in _INTERPOLATIONS:  # e.g. 'random' or 'lanczos'
            interpolation = "bicubic"
        return cls(
            input_size=(int(height), int(width)),
            crop_pct=float(config.get("crop_pct", 0.875) or 1.0),
            crop_mode=config.get("crop_mode", "center") or "center",
            interpolation=interpolation,
            mean=tuple(float(m) for m in config["mean"]),
            std=tuple(float(s) for s in config["std"]),
        )

    @classmethod
    def from_torchvision_transforms(cls, transforms: Any) -> "Preprocessing":
        """Build from a torchvision ``ImageClassification`` preset transform."""
        crop = int(transforms.crop_size[0])
        resize = int(transforms.resize_size[0])
        interpolation = transforms.interpolation.value
        return cls(
            input_size=(crop, crop),
            crop_pct=crop / resize,
            crop_mode="center",
            interpolation=interpolation if interpolation in _INTERPOLATIONS else "bilinear",
            mean=tuple(float(m) for m in transforms.mean),
            std=tuple(float(s) for s in transforms.std),
        )

    def with_crop(self, crop: str) -> "Preprocessing":
        """The same preprocessing with another resizing policy."""
        return dataclasses.replace(self, crop=crop)

    def as_dict(self) -> dict[str, Any]:
        """A plain description (stable across processes; part of cache keys)."""
        return asdict(self)

    @property
    def scale_size(self) -> tuple[int, int]:
        return (
            math.floor(self.input_size[0] / self.crop_pct),
            math.floor(self.input_size[1] / self.crop_pct),
        )

    def resize_crop(self, image: torch.Tensor) -> torch.Tensor:
        """Resize and crop one ``(3, H, W)`` uint8 image to ``input_size``."""
        mode = _INTERPOLATIONS[self.interpolation]
        crop = self.crop
        if crop == "auto":
            h, w = image.shape[-2:]
            crop = "none" if h < self.input_size[0] and w < self.input_size[1] else "center"
        if crop == "none":
            return F.resize(image, list(self.input_size), interpolation=mode, antialias=True)
        if crop == "pad":
            return self._letterbox(image, mode)
        scale_h, scale_w = self.scale_size
        if self.crop_mode == "squash":
            size = [scale_h, scale_w]
        elif self.crop_mode == "border":
            h, w = image.shape[-2:]
            ratio = max(scale_h, scale_w) / max(h, w)
            size = [max(1, round(h * ratio)), max(1, round(w * ratio))]
        elif scale_h == scale_w:
            size = [scale_h]  # short side, aspect kept (timm's square case)
        else:
            size = [scale_h, scale_w]
        image = F.resize(image, size, interpolation=mode, antialias=True)
        return F.center_crop(image, list(self.input_size))

    def _letterbox(self, image: torch.Tensor, mode) -> torch.Tensor:
        h, w = image.shape[-2:]
        ratio = min(self.input_size[0] / h, self.input_size[1] / w)
        size = [max(1, round(h * ratio)), max(1, round(w * ratio))]
        image = F.resize(image, size, interpolation=mode, antialias=True)
        top = (self.input_size[0] - size[0]) // 2
        left = (self.input_size[1] - size[1]) // 2
        canvas = torch.empty((3, *self.input_size), dtype=image.dtype)
        canvas[:] = torch.tensor([round(m * 255) for m in self.mean], dtype=image.dtype).view(3, 1, 1)
        canvas[:, top : top + size[0], left : left + size[1]] = image
        return canvas  # padded with the mean colour: zeros after normalisation

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """Scale a uint8 ``(N, 3, H, W)`` batch to float and normalise it in place."""
        out = batch.float().div_(255.0)
        mean = torch.tensor(self.mean, device=out.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=out.device).view(1, 3, 1, 1)
        return out.sub_(mean).div_(std)
