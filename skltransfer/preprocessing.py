"""Resolved preprocessing: from a model's data config to pixels it can eat.

One job: hold the exact resize / crop / normalisation a backbone expects and
apply it. Resizing and cropping run on ``uint8`` tensors (cheap to move
between processes); normalisation runs once per collated batch, on the
device that runs the model.

The geometry follows timm's eval transform (``timm.data.transforms_factory.
transforms_imagenet_eval``): ``scale_size = floor(input_size / crop_pct)``,
then a centre crop, with timm's ``center``, ``squash`` and ``border`` crop
modes: ``center`` keeps the aspect ratio (for a non-square input too, as
timm's ``ResizeKeepRatio``), ``border`` pads with the mean colour (timm's
``CenterCropOrPad``). It is reimplemented on ``uint8`` tensors rather than
called: timm's works on PIL images, one at a time, in float after
normalisation; ours runs in DataLoader workers before batching and leaves
normalisation to the model's device. torchvision weights map onto the same
description.

The geometry (which policy, what size) needs no torch: :mod:`skltransfer.serving`
reads it without torch installed; torch is imported where pixels are touched.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .decoding import DEFAULT_MAX_IMAGE_PIXELS, try_image_size

if TYPE_CHECKING:
    import torch

__all__ = ["CROP_POLICIES", "INTERPOLATIONS", "MAX_STRETCH", "Preprocessing", "auto_input_size", "interpolation_mode"]

#: ``crop`` policies: ``"center"`` the model's own resize + centre crop;
#: ``"none"`` resize straight to the input size (nothing cut, aspect not kept);
#: ``"pad"`` resize the long side and pad (letterbox, aspect kept);
#: ``"auto"`` ``"none"`` for an image smaller than the input on both sides
#: (a 32 px CIFAR image has no border to spare), ``"center"`` otherwise.
CROP_POLICIES = ("auto", "center", "none", "pad")

#: Resized sides longer than this many times the crop are cut before resizing (see
#: ``Preprocessing._keep_what_the_crop_keeps``); no photo comes near it.
MAX_STRETCH = 8

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def interpolation_mode(name: str):
    """torchvision's ``InterpolationMode`` for an interpolation name."""
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


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
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")

    @classmethod
    def from_timm_config(cls, config: dict[str, Any]) -> "Preprocessing":
        """Build from a timm data config (``timm.data.resolve_model_data_config``)."""
        _, height, width = config["input_size"]
        interpolation = config.get("interpolation", "bicubic")
        if interpolation not in INTERPOLATIONS:  # e.g. 'random' or 'lanczos'
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
            interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
            mean=tuple(float(m) for m in transforms.mean),
            std=tuple(float(s) for s in transforms.std),
        )

    def with_crop(self, crop: str) -> "Preprocessing":
        """The same preprocessing with another resizing policy."""
        return dataclasses.replace(self, crop=crop)

    def with_input_size(self, size: int | tuple[int, int] | list[int] | None) -> "Preprocessing":
        """The same preprocessing at another input size (``None``: this one).

        As timm's ``resolve_data_config(args={"input_size": ...})`` overrides a
        model's pretrained size: the resize keeps ``crop_pct``, so the centre
        crop cuts the same fraction at every size. Convolutional networks with
        global pooling accept any size; fewer pixels are proportionally less
        compute.

        Examples
        --------
        >>> p = Preprocessing((224, 224), 0.875, "center", "bicubic", (0.5,) * 3, (0.5,) * 3)
        >>> p.with_input_size(128).input_size, p.with_input_size(128).scale_size
        ((128, 128), (146, 146))
        """
        if size is None:
            return self
        return dataclasses.replace(self, input_size=check_input_size(size))

    def as_dict(self) -> dict[str, Any]:
        """A plain description (stable across processes; part of cache keys).

        Configurations whose pixels changed when the geometry was aligned with
        timm's eval transform (``"border"``, and ``"center"`` with a
        non-square input) carry a ``geometry`` mark, so that no row cached
        for the old pixels is served for the new ones; every other
        configuration keeps its key.
        """
        description = asdict(self)
        scale_h, scale_w = self.scale_size
        if self.crop_mode == "border" or (self.crop_mode == "center" and scale_h != scale_w):
            description["geometry"] = "timm-eval"
        return description

    @property
    def scale_size(self) -> tuple[int, int]:
        return (
            math.floor(self.input_size[0] / self.crop_pct),
            math.floor(self.input_size[1] / self.crop_pct),
        )

    def policy(self, height: int, width: int) -> str:
        """The crop policy applied to an image of this size (``"auto"`` resolved)."""
        if self.crop != "auto":
            return self.crop
        small = height < self.input_size[0] and width < self.input_size[1]
        return "none" if small else "center"

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``(height, width)`` is resized to before cropping or padding.

        Decoding may stop at any size no smaller than this (a JPEG reduced
        in libjpeg's DCT, :mod:`~skltransfer.decoding`).

        Examples
        --------
        >>> p = Preprocessing((224, 224), 0.875, "center", "bicubic", (0.5,) * 3, (0.5,) * 3)
        >>> p.resized_size(375, 500)
        (256, 341)
        """
        policy = self.policy(height, width)
        if policy == "none":
            return self.input_size
        if policy == "pad":
            ratio = min(self.input_size[0] / height, self.input_size[1] / width)
            return max(1, round(height * ratio)), max(1, round(width * ratio))
        scale_h, scale_w = self.scale_size
        if self.crop_mode == "squash":
            return scale_h, scale_w
        if self.crop_mode == "border" or scale_h != scale_w:
            # timm's ResizeKeepRatio: "border" fits the image inside the scale size, "center"
            # (non-square) covers it; the aspect ratio is kept either way.
            ratio_h, ratio_w = height / scale_h, width / scale_w
            ratio = max(ratio_h, ratio_w) if self.crop_mode == "border" else min(ratio_h, ratio_w)
            return max(1, round(height / ratio)), max(1, round(width / ratio))
        # The short side to scale_h, aspect kept: torchvision's rule for resize(image, [size]).
        short, long = sorted((height, width))
        long = int(scale_h * long / short)
        return (scale_h, long) if height <= width else (long, scale_h)

    def resize_crop(self, image: torch.Tensor) -> torch.Tensor:
        """Resize and crop one ``(3, H, W)`` uint8 image to ``input_size``."""
        from torchvision.transforms.v2 import functional as F

        height, width = image.shape[-2:]
        policy = self.policy(height, width)
        size = self.resized_size(height, width)
        if policy == "center":
            image, size = self._keep_what_the_crop_keeps(image, size)
        image = F.resize(image, list(size), interpolation=interpolation_mode(self.interpolation), antialias=True)
        size = tuple(image.shape[-2:])
        if policy == "none":
            return image
        if policy == "pad":
            return self._letterbox(image)
        if self.crop_mode == "border":  # timm's CenterCropOrPad: the borders take the mean colour
            crop_h, crop_w = self.input_size
            return self._letterbox(F.center_crop(image, [min(crop_h, size[0]), min(crop_w, size[1])]))
        return F.center_crop(image, list(self.input_size))

    def _keep_what_the_crop_keeps(self, image: torch.Tensor, size: tuple[int, int]):
        """For an extreme aspect ratio, resize only the middle of the long side that the crop keeps.

        A 1 x 60,000 strip resized short side first would become 256 x 15 million pixels (12 GB)
        before the centre crop kept 224 of them. Past ``MAX_STRETCH`` times the crop, the source
        is cut to the part that maps onto twice the crop (a wide margin for the resampling
        filter) and that part is resized at the same scale. Ordinary images are not touched.
        """
        height, width = image.shape[-2:]
        out_h, out_w = size
        crop_h, crop_w = self.input_size
        if out_h > MAX_STRETCH * crop_h:
            keep = max(1, math.ceil(2 * crop_h * height / out_h))
            top = (height - keep) // 2
            image, out_h = image[:, top : top + keep], 2 * crop_h
        if out_w > MAX_STRETCH * crop_w:
            keep = max(1, math.ceil(2 * crop_w * width / out_w))
            left = (width - keep) // 2
            image, out_w = image[:, :, left : left + keep], 2 * crop_w
        return image, (out_h, out_w)

    def _letterbox(self, image: torch.Tensor) -> torch.Tensor:
        import torch

        size = image.shape[-2:]
        top = (self.input_size[0] - size[0]) // 2
        left = (self.input_size[1] - size[1]) // 2
        canvas = torch.empty((3, *self.input_size), dtype=image.dtype)
        canvas[:] = torch.tensor([round(m * 255) for m in self.mean], dtype=image.dtype).view(3, 1, 1)
        canvas[:, top : top + size[0], left : left + size[1]] = image
        return canvas  # padded with the mean colour: zeros after normalisation

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """Scale a uint8 ``(N, 3, H, W)`` batch to float and normalise it in place."""
        import torch

        out = batch.float().div_(255.0)
        mean = torch.tensor(self.mean, device=out.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=out.device).view(1, 3, 1, 1)
        return out.sub_(mean).div_(std)


#: The smallest input size accepted: EfficientNets and ResNets downsample 32x.
MIN_INPUT_SIZE = 32


def check_input_size(size: Any) -> tuple[int, int]:
    """``size`` (an int, or ``(height, width)``) as a ``(height, width)`` tuple, or a ValueError saying why not.

    Examples
    --------
    >>> check_input_size(160), check_input_size((128, 96))
    ((160, 160), (128, 96))
    """
    pair = (size, size) if isinstance(size, numbers.Integral) and not isinstance(size, bool) else size
    try:
        height, width = pair
        valid = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (height, width))
    except (TypeError, ValueError):
        valid = False
    if not valid or min(int(height), int(width)) < MIN_INPUT_SIZE:
        raise ValueError(f"input_size must be None, an int or (height, width) of ints >= {MIN_INPUT_SIZE}, "
                         f"got {size!r}")
    return int(height), int(width)


#: ``input_size="auto"``: training images whose median longer side is at most this many pixels
#: are *small* (digits, icons, CIFAR-like thumbnails): every pixel the network sees at its own
#: size is interpolated from a few, so a smaller input shows them as well.
SMALL_IMAGE_SIDE = 64

#: ``input_size="auto"``: the shorter input side small images train and predict at (about half
#: the compute of 224 px); chosen for, and measured on, EfficientNet-Lite0 (the user guide's
#: "Small images" section has the figures).
SMALL_IMAGE_INPUT = 160

#: Images whose size ``auto_input_size`` reads: enough for a median, few enough to stay cheap.
SIZE_SAMPLE = 256


def auto_input_size(items, native: tuple[int, int], *,
                    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int] | None:
    """The input size ``input_size="auto"`` trains at: smaller for small images, else ``None``.

    Reads the sizes (headers only) of up to ``SIZE_SAMPLE`` images spread
    evenly through ``items``. If the median image's longer side is at most
    ``SMALL_IMAGE_SIDE`` pixels, returns ``native`` scaled so that its
    shorter side is ``SMALL_IMAGE_INPUT`` (rounded to a multiple of 8);
    ``None`` (the native size) when the images are larger, when ``native``
    is no larger than that already, or when no sampled image can be read
    (decoding reports those later, naming each).

    Examples
    --------
    >>> import numpy as np
    >>> auto_input_size(np.zeros((10, 32, 32, 3), dtype=np.uint8), (224, 224))
    (160, 160)
    >>> auto_input_size(np.zeros((10, 96, 128, 3), dtype=np.uint8), (224, 224)) is None
    True
    """
    if min(native) <= SMALL_IMAGE_INPUT or len(items) == 0:
        return None
    positions = np.unique(np.linspace(0, len(items) - 1, min(len(items), SIZE_SAMPLE)).round().astype(int))
    sides = [max(size) for size, _ in (try_image_size(items[int(i)], max_pixels=max_pixels) for i in positions)
             if size is not None]
    if not sides or float(np.median(sides)) > SMALL_IMAGE_SIDE:
        return None
    scale = SMALL_IMAGE_INPUT / min(native)
    return tuple(max(MIN_INPUT_SIZE, int(round(side * scale / 8)) * 8) for side in native)
