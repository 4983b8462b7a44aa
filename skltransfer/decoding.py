"""Decoding any supported input into RGB pixels.

One job: turn one *image item* (a path, encoded bytes, a PIL image or a
``uint8`` array) into a ``(3, H, W)`` ``uint8`` tensor, or say precisely why
that is impossible. Batching, resizing and models live elsewhere.

JPEG, PNG, WebP and GIF go through torchvision's libjpeg-turbo / libpng
decoders (fast, and they apply EXIF orientation); everything else Pillow can
open (BMP, TIFF, 16-bit and CMYK files, ...) goes through Pillow. A caller
that will shrink the image anyway can say how large it needs it
(``min_size``): a JPEG at least twice that size on both sides is then
decoded reduced by 1/2, 1/4 or 1/8 inside libjpeg's inverse DCT (Pillow's
``Image.draft``), never below the size asked for. A 2592 x 1984 photo
headed for 224 px costs a third less that way. torchvision
0.29 marks its decoders deprecated in favour of TorchCodec; this module is the
only place that would change on a move.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageItem",
    "ImageLoadError",
    "ImageFailure",
    "as_image_items",
    "decode_rgb",
    "describe_item",
    "read_item_bytes",
]

ImageItem = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Pillow modes that hold more than 8 bits per sample: scaled down to 8 bits.
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class ImageFailure:
    """One input that could not be turned into pixels."""

    index: int
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class ImageLoadError(ValueError):
    """One or more inputs could not be decoded into an image.

    Attributes
    ----------
    failures : list of ImageFailure
        Every bad input found, with its position in ``X``, a description
        (the file path where there is one) and the reason.
    """

    MAX_LISTED = 20

    def __init__(self, failures: Sequence[ImageFailure]):
        self.failures = list(failures)
        lines = [f"  [{f.index}] {f}" for f in self.failures[: self.MAX_LISTED]]
        more = len(self.failures) - self.MAX_LISTED
        if more > 0:
            lines.append(f"  ... and {more} more (see the exception's .failures)")
        noun = "image" if len(self.failures) == 1 else "images"
        super().__init__(
            f"{len(self.failures)} {noun} could not be read:\n" + "\n".join(lines)
        )

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.failures,))


class _BadImage(Exception):
    """Internal: carries the reason one item failed."""


def as_image_items(X: Any) -> Sequence[ImageItem]:
    """Return ``X`` as an indexable sequence of single image items.

    Accepts a list, tuple, pandas Series or 1-D object array of items, or one
    ``uint8`` array of stacked images shaped ``(N, H, W)`` or ``(N, H, W, C)``.

    Raises
    ------
    TypeError
        If ``X`` is a single item, a mapping, or another container.
    """
    if isinstance(X, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        raise TypeError(
            "X must be a sequence of images (a list of paths, for example), "
            f"got a single {type(X).__name__}; wrap it in a list."
        )
    if hasattr(X, "iloc") and hasattr(X, "to_numpy"):  # pandas Series / 1-column frame
        values = X.to_numpy()
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise TypeError(
                "A DataFrame input must have exactly one column of images, "
                f"got {values.shape[1]} columns."
            )
        return list(values)
    if isinstance(X, np.ndarray):
        if X.dtype == object:
            if X.ndim == 2 and X.shape[1] == 1:
                X = X[:, 0]
            if X.ndim != 1:
                raise TypeError(
                    f"An object array X must be 1-D (one image per entry), got shape {X.shape}."
                )
            return list(X)
        if X.ndim in (3, 4):
            return X  # stacked images: X[i] is one image
        raise TypeError(
            "A numeric array X must stack images as (N, H, W) or (N, H, W, C) "
            f"uint8, got an array of shape {X.shape} and dtype {X.dtype}."
        )
    if isinstance(X, (list, tuple)):
        return X
    if isinstance(X, dict) or not hasattr(X, "__len__") or not hasattr(X, "__getitem__"):
        raise TypeError(
            "X must be a list, tuple, ndarray or pandas Series of images, "
            f"got {type(X).__name__}."
        )
    return X


def describe_item(item: ImageItem) -> str:
    """A short human description of an item, used in error messages."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    if isinstance(item, Image.Image):
        name = getattr(item, "filename", "") or ""
        return name or f"<PIL image {item.mode} {item.size[0]}x{item.size[1]}>"
    if isinstance(item, np.ndarray):
        return f"<array {item.dtype} {tuple(item.shape)}>"
    return f"<{type(item).__name__}>"


def read_item_bytes(item: ImageItem) -> bytes:
    """Read the encoded bytes of a path item, with readable errors.

    Raises
    ------
    _BadImage
        If the path is missing, a directory, unreadable or empty.
    """
    path = Path(os.fspath(item))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _BadImage("no such file") from None
    except IsADirectoryError:
        raise _BadImage("is a directory, not an image file") from None
    except PermissionError:
        raise _BadImage("permission denied") from None
    except OSError as exc:
        raise _BadImage(f"cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise _BadImage("file is empty (0 bytes)")
    return data


#: ``min_size``: (height, width) as shown -> the smallest (height, width) the caller needs.
SizeNeeded = Callable[[int, int], tuple[int, int]]


def decode_rgb(item: ImageItem, min_size: SizeNeeded | None = None) -> torch.Tensor:
    """Decode one image item into a ``(3, H, W)`` ``uint8`` RGB tensor.

    Grayscale, RGBA, palette, CMYK and 16-bit images become 8-bit RGB (alpha
    is dropped, 16-bit samples keep their top 8 bits); EXIF orientation is
    applied to files, bytes and PIL images.

    Parameters
    ----------
    item : str, PathLike, bytes, PIL.Image.Image or ndarray
        A path to an image file, the encoded bytes of one, a PIL image, or a
        ``uint8`` array shaped ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or
        ``(H, W, 4)``.
    min_size : callable, optional
        Maps the image's ``(height, width)`` (as displayed, after EXIF
        orientation) to the smallest ``(height, width)`` the caller needs,
        e.g. :meth:`Preprocessing.resized_size
        <skltransfer.preprocessing.Preprocessing.resized_size>`. A JPEG at
        least twice as large on both sides is decoded reduced, to no less
        than that. Without it, images are decoded at full size.

    Returns
    -------
    torch.Tensor
        ``uint8`` tensor of shape ``(3, H, W)``.

    Raises
    ------
    ImageLoadError
        With a single failure naming the item and the reason.

    Examples
    --------
    >>> import numpy as np
    >>> decode_rgb(np.zeros((4, 6), dtype=np.uint8)).shape
    torch.Size([3, 4, 6])
    """
    try:
        return _decode(item, min_size)
    except _BadImage as exc:
        raise ImageLoadError([ImageFailure(0, describe_item(item), str(exc))]) from None


def try_decode_rgb(item: ImageItem, min_size: SizeNeeded | None = None) -> tuple[torch.Tensor | None, str | None]:
    """Like :func:`decode_rgb`, but returns ``(None, reason)`` on failure."""
    try:
        return _decode(item, min_size), None
    except _BadImage as exc:
        return None, str(exc)


def _decode(item: ImageItem, min_size: SizeNeeded | None = None) -> torch.Tensor:
    if isinstance(item, (str, os.PathLike)):
        return _decode_bytes(read_item_bytes(item), min_size)
    if isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise _BadImage("empty bytes object")
        return _decode_bytes(bytes(item), min_size)
    if isinstance(item, Image.Image):
        return _from_pil(item)
    if isinstance(item, np.ndarray):
        return _from_array(item)
    raise _BadImage(
        f"unsupported input type {type(item).__name__}; expected a path, bytes, "
        "a PIL image or a uint8 array"
    )


_JPEG_MAGIC = b"\xff\xd8\xff"
#: EXIF orientations that swap width and height (rotations by 90 degrees).
_TRANSPOSING = {5, 6, 7, 8}


def _decode_bytes(data: bytes, min_size: SizeNeeded | None = None) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    if min_size is not None and data.startswith(_JPEG_MAGIC):
        reduced = _decode_jpeg_reduced(data, min_size)
        if reduced is not None:
            return reduced

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as exc:
        message = str(exc)
        if "Unsupported image file" not in message:
            # The format was recognised but the data is broken: say so.
            detail = message.rsplit(",", 1)[-1].strip() or "decoder error"
            raise _BadImage(f"corrupt or truncated image data ({detail})") from None
        return _decode_with_pillow(data)
    if image.ndim == 4:  # animated GIF / WebP: the first frame
        image = image[0]
    return _to_uint8(image)


def _decode_jpeg_reduced(data: bytes, min_size: SizeNeeded) -> torch.Tensor | None:
    """Decode a JPEG scaled down in its DCT when it is at least twice the size needed, else None.

    Reading the header costs ~20 us; a header Pillow cannot read is left to
    the full decoder, which names the problem.
    """
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return None
    transposed = orientation in _TRANSPOSING
    need_h, need_w = min_size(*((width, height) if transposed else (height, width)))
    if transposed:
        need_h, need_w = need_w, need_h
    if height < 2 * need_h or width < 2 * need_w:
        return None  # no power-of-two reduction fits: decode in full
    img.draft("RGB", (need_w, need_h))  # the largest 1/2, 1/4, 1/8 that stays >= (need_w, need_h)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise _BadImage(f"corrupt or truncated image data ({exc})") from None
    return _from_pil(img)


def _decode_with_pillow(data: bytes) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _from_pil(img)
    except UnidentifiedImageError:
        raise _BadImage("not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _BadImage(f"corrupt or truncated image data ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise _BadImage(str(exc)) from None


def _from_pil(img: Image.Image) -> torch.Tensor:
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the pixels
        pass
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img).astype(np.uint32)
        arr = np.clip(arr >> 8, 0, 255).astype(np.uint8)
        return _from_array(arr)
    try:
        rgb = img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise _BadImage(f"cannot convert {img.mode} image to RGB ({exc})") from None
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _from_array(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype != np.uint8:
        raise _BadImage(
            f"array dtype is {arr.dtype}; pass uint8 pixels (0-255), e.g. "
            "(x * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise _BadImage(
            f"array shape {arr.shape} is not an image; expected (H, W), (H, W, 1), "
            "(H, W, 3) or (H, W, 4)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _BadImage(f"array shape {arr.shape} has no pixels")
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:
        tensor = tensor[:3]
    return tensor.contiguous()


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.uint16:
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    raise _BadImage(f"unsupported decoded pixel type {image.dtype}")
