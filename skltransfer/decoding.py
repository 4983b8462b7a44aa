"""Decoding any supported input into RGB pixels.

One job: turn one *image item* (a path, encoded bytes, a PIL image or a
``uint8`` array) into a ``(3, H, W)`` ``uint8`` tensor, or say precisely why
that is impossible. Batching, resizing and models live elsewhere.

JPEGs go through torchvision's libjpeg-turbo decoder (fast, and it applies
EXIF orientation); everything else Pillow can open (PNG, WebP, GIF, BMP,
TIFF, 16-bit and CMYK files, ...) goes through Pillow. A caller
that will shrink the image anyway can say how large it needs it
(``min_size``): a JPEG at least 4 times that size on both sides is then
decoded reduced by 1/2, 1/4 or 1/8 inside libjpeg's inverse DCT (Pillow's
``Image.draft``), never below twice the size asked for, so that the resize
still does the final filtering and the features stay within cosine 0.999 of
a full decode. A 12-megapixel phone photo headed for 224 px decodes at 1/4.

Untrusted input: an encoded image's size is read from its header (Pillow's
parsers, ~20 us) before any pixel is decoded, and an image of more than
``max_pixels`` pixels is refused there (default 178,956,970: where Pillow
raises ``DecompressionBombError``, so both decoders agree). A 70-byte PNG
that claims 60,000 x 60,000 pixels is an error naming its size, not a 10 GB
allocation. Decoder failures are reported as reasons a person understands
(truncated file, corrupt data, too many pixels, out of memory, not an image),
never as a decoder's source line. torchvision
0.29 marks its decoders deprecated in favour of TorchCodec; this module is the
only place that would change on a move.

:func:`decode_rgb_array` is the same decoding with Pillow alone, into a
``(H, W, 3)`` numpy array, for scoring where torch is not installed
(:mod:`skltransfer.serving`); importing this module imports no torch.
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageItem",
    "ImageLoadError",
    "ImageFailure",
    "as_image_items",
    "decode_rgb",
    "decode_rgb_array",
    "describe_item",
    "read_item_bytes",
    "try_image_size",
]

ImageItem = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

#: The default pixel limit: Pillow raises ``DecompressionBombError`` above twice its
#: ``Image.MAX_IMAGE_PIXELS`` (89,478,485), so both decoders refuse the same images.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

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
    rows : ndarray or None
        What was computed for the good inputs, one row per input of ``X``
        (the bad inputs' rows are undefined), so that a caller can use them
        instead of computing them again; None where nothing was computed.
    """

    MAX_LISTED = 20

    def __init__(self, failures: Sequence[ImageFailure], rows: np.ndarray | None = None):
        self.failures = list(failures)
        self.rows = rows
        lines = [f"  [{f.index}] {f}" for f in self.failures[: self.MAX_LISTED]]
        more = len(self.failures) - self.MAX_LISTED
        if more > 0:
            lines.append(f"  ... and {more} more (see the exception's .failures)")
        noun = "image" if len(self.failures) == 1 else "images"
        super().__init__(
            f"{len(self.failures)} {noun} could not be read:\n" + "\n".join(lines)
        )

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.failures, self.rows))


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


def decode_rgb(item: ImageItem, min_size: SizeNeeded | None = None, *,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
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
        least 4 times as large on both sides is decoded reduced, to no less
        than twice that. Without it, images are decoded at full size.
    max_pixels : int or None, default=178_956_970
        Images with more pixels are refused before decoding (from the
        header of encoded input; from the size of PIL images and arrays).
        ``None``: no limit.

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
    return _or_load_error(item, _decode, min_size, max_pixels)


def _or_load_error(item: ImageItem, decode: Callable, min_size, max_pixels):
    """``decode(item, ...)``, a failure raised as an :class:`ImageLoadError` naming the item."""
    try:
        return decode(item, min_size, max_pixels)
    except _BadImage as exc:
        reason = str(exc)
    except MemoryError:
        reason = "out of memory while decoding"
    raise ImageLoadError([ImageFailure(0, describe_item(item), reason)])


def decode_rgb_array(item: ImageItem, min_size: SizeNeeded | None = None, *,
                     max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one image item into a ``(H, W, 3)`` ``uint8`` array, with Pillow alone (no torch).

    The same checks, conversions, EXIF orientation, reduced JPEG decoding
    and errors (:class:`ImageLoadError`) as :func:`decode_rgb`; JPEGs decoded
    in full go through Pillow's libjpeg-turbo instead of torchvision's.

    Examples
    --------
    >>> import numpy as np
    >>> decode_rgb_array(np.zeros((4, 6), dtype=np.uint8)).shape
    (4, 6, 3)
    """
    return _or_load_error(item, _decode_array, min_size, max_pixels)


def try_decode_rgb(
    item: ImageItem, min_size: SizeNeeded | None = None, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor | None, str | None]:
    """Like :func:`decode_rgb`, but returns ``(None, reason)`` on failure."""
    try:
        return _decode(item, min_size, max_pixels), None
    except _BadImage as exc:
        return None, str(exc)
    except MemoryError:
        return None, "out of memory while decoding"


def try_image_size(
    item: ImageItem, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[tuple[int, int] | None, str | None]:
    """``((height, width), None)`` as the image displays, or ``(None, reason)``; no pixel decoded.

    Encoded images are measured from their header (with the EXIF rotation of
    JPEGs), PIL images and arrays from their size, under the same checks as
    :func:`decode_rgb`. The file is still read whole: this is for sampling
    sizes, not for scanning a large collection.

    Examples
    --------
    >>> import numpy as np
    >>> try_image_size(np.zeros((4, 6, 3), dtype=np.uint8))
    ((4, 6), None)
    >>> try_image_size(b"not an image")
    (None, 'not an image file (unrecognised format)')
    """
    try:
        data = _encoded_bytes(item)
        if data is not None:
            _, header = _read_header(data, max_pixels)
            width, height = header.width, header.height
            if header.orientation in _TRANSPOSING:
                width, height = height, width
            return (height, width), None
        if isinstance(item, Image.Image):
            width, height = item.size
            _check_pixels(width, height, max_pixels)
            try:
                if int(item.getexif().get(0x0112, 1)) in _TRANSPOSING:
                    width, height = height, width
            except Exception:  # a broken EXIF block: decode_rgb ignores it too
                pass
            return (height, width), None
        if isinstance(item, np.ndarray) and item.ndim in (2, 3):
            _check_pixels(item.shape[1], item.shape[0], max_pixels)
            return (int(item.shape[0]), int(item.shape[1])), None
        return _decode_array(item, None, max_pixels).shape[:2], None  # the decoder says why not
    except _BadImage as exc:
        return None, str(exc)


def _decode(item: ImageItem, min_size: SizeNeeded | None, max_pixels: int | None) -> torch.Tensor:
    pixels = _decode_array(item, min_size, max_pixels, fast_jpeg=True)
    if isinstance(pixels, np.ndarray):
        return _chw_tensor(pixels)
    return pixels  # decoded by torchvision


def _chw_tensor(rgb: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _decode_array(item: ImageItem, min_size: SizeNeeded | None, max_pixels: int | None, *,
                  fast_jpeg: bool = False):
    """``(H, W, 3)`` uint8 pixels; with ``fast_jpeg`` a full-size JPEG comes as torchvision's ``(3, H, W)`` tensor."""
    data = _encoded_bytes(item)
    if data is not None:
        return _decode_bytes(data, min_size, max_pixels, fast_jpeg=fast_jpeg)
    if isinstance(item, Image.Image):
        _check_pixels(item.size[0], item.size[1], max_pixels)
        return _from_pil(item)
    if isinstance(item, np.ndarray):
        if item.ndim >= 2:
            _check_pixels(item.shape[1], item.shape[0], max_pixels)
        return _from_array(item)
    raise _BadImage(
        f"unsupported input type {type(item).__name__}; expected a path, bytes, "
        "a PIL image or a uint8 array"
    )


def _encoded_bytes(item: ImageItem) -> bytes | None:
    """The encoded bytes of a path or bytes item (read from disk for a path); None for pixels."""
    if isinstance(item, (str, os.PathLike)):
        return read_item_bytes(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise _BadImage("empty bytes object")
        return bytes(item)
    return None


_JPEG_MAGIC = b"\xff\xd8\xff"
#: EXIF orientations that swap width and height (rotations by 90 degrees).
_TRANSPOSING = {5, 6, 7, 8}


@dataclass(frozen=True)
class _Header:
    format: str
    width: int
    height: int
    orientation: int


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise _BadImage(
            f"too many pixels: {width} x {height} = {width * height:,}, over the limit of {max_pixels:,} "
            "(max_image_pixels); if you trust this file, pass a larger max_image_pixels "
            "(--max-image-pixels on the command line)"
        )


_PILLOW_LIMIT_LOCK = threading.Lock()


def _open_unloaded(data: bytes, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (the header only) with Pillow's own pixel check out of our way.

    Pillow refuses images above twice its module-wide ``MAX_IMAGE_PIXELS``
    without saying their size. Where that is about to happen (a limit raised
    above Pillow's, or a bomb whose size the error must name) the header is
    read again with Pillow's check off, under a lock so that our own threads
    do not restore each other's value; :func:`_check_pixels` is the check.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if pillow_limit is None or (max_pixels is not None and max_pixels <= 2 * pillow_limit):
            try:
                return Image.open(io.BytesIO(data))
            except Image.DecompressionBombError:
                pass  # over Pillow's limit, so over ours: read the size to say it
        with _PILLOW_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = None
            try:
                return Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit


def _read_header(data: bytes, max_pixels: int | None) -> tuple[Image.Image, _Header]:
    """The unloaded image and its format, size and EXIF orientation; no pixel decoded.

    Every encoded image passes here before any decoder allocates pixels. A
    file whose header Pillow cannot read is refused, never handed to a
    native decoder to find out.

    Raises
    ------
    _BadImage
        For an unreadable header, or more than ``max_pixels`` pixels.
    """
    try:
        img = _open_unloaded(data, max_pixels)
        width, height = img.size
    except UnidentifiedImageError:
        raise _BadImage("not an image file (unrecognised format)") from None
    except Exception as exc:  # each format's parser fails in its own way
        if _truncated(str(exc)):
            raise _BadImage(_TRUNCATED) from None
        raise _BadImage(f"corrupt image header ({_decoder_detail(str(exc))})") from None
    _check_pixels(width, height, max_pixels)
    orientation = 1
    if img.format in ("JPEG", "MPO"):  # for the DCT-reduced path (a PNG's getexif() decodes the pixels)
        try:
            orientation = int(img.getexif().get(0x0112, 1))
        except Exception:  # a broken EXIF block does not make the pixels unreadable
            pass
    return img, _Header(img.format or "image", width, height, orientation)


#: Formats decoded by torchvision (libjpeg-turbo: about 1.4x Pillow's speed on the
#: hymenoptera photos); everything else by Pillow. Not PNG: torchvision 0.29's PNG decoder
#: crashes the process (SIGSEGV) on any libpng error, a flipped bit in the image data
#: included (found by tests/_fuzz.py). GIF and WebP decode to the same pixels either way.
_TORCHVISION_FORMATS = {"JPEG", "MPO"}


def _decode_bytes(data: bytes, min_size: SizeNeeded | None = None,
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, *, fast_jpeg: bool = False):
    img, header = _read_header(data, max_pixels)
    if header.format not in _TORCHVISION_FORMATS:
        return _load_with_pillow(img, header)
    if min_size is not None and header.format in ("JPEG", "MPO"):
        reduced = _decode_jpeg_reduced(img, header, min_size)
        if reduced is not None:
            return reduced
    if not fast_jpeg:
        return _load_with_pillow(img, header)
    return _decode_with_torchvision(data, img, header)


def _decode_with_torchvision(data: bytes, img: Image.Image, header: _Header) -> torch.Tensor:
    import torch
    from torchvision.io import ImageReadMode, decode_image

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as exc:
        if "Unsupported image file" in str(exc):  # a variant torchvision does not take
            return _load_with_pillow(img, header)
        raise _BadImage(_decoder_reason(str(exc), header)) from None
    except MemoryError:
        raise _BadImage(_out_of_memory(header)) from None
    if image.ndim == 4:  # animated GIF / WebP: the first frame
        image = image[0]
    return _to_uint8(image)


# Decoder messages (torchvision's libjpeg / libpng / libwebp / giflib wrappers, Pillow)
# that mean the data stops early.
_TRUNCATION = ("truncated", "incomplete", "premature end", "out of bound read", "unexpected end",
               "dgifslurp() failed - 102", "not enough data", "buffer is too small", "truncated file read")
_ALLOCATION = ("bad_alloc", "out of memory", "cannot allocate", "memory allocation")


def _decoder_detail(message: str) -> str:
    """A decoder message without the decoder's source file or line."""
    # "decode_jpeg, /path/decode_jpeg.cpp:171, Quantization table 0x00 was not defined" -> the last part
    detail = re.sub(r"^\w+, [^,]*\.(?:cpp|c|h|hpp):\d+, ", "", message.strip())
    detail = re.sub(r"\s*\(?\bline \d+\)?", "", detail).strip(" .")
    return (detail.splitlines() or ["the decoder refused it"])[0][:200] or "the decoder refused it"


_TRUNCATED = "truncated file: the image data ends early"


def _truncated(message: str) -> bool:
    return any(word in message.lower() for word in _TRUNCATION)


def _decoder_reason(message: str, header: _Header) -> str:
    """A decoder's error message as a reason a person understands."""
    lower = message.lower()
    if _truncated(message):
        return _TRUNCATED
    if any(word in lower for word in _ALLOCATION):
        return _out_of_memory(header)
    return f"corrupt {header.format} data ({_decoder_detail(message)})"


def _out_of_memory(header: _Header) -> str:
    return f"out of memory while decoding a {header.width} x {header.height} image"


#: Reduced JPEGs keep at least this many times the size the caller needs. libjpeg's scaled
#: inverse DCT is a different low-pass filter from the antialiased resize that follows:
#: decoding the hymenoptera photos straight to the resize's input moved EfficientNet-Lite0
#: features to cosine 0.980 (8 of 397 photos below 0.999); with a margin of 2 the resize
#: does the final filtering and every photo stays above 0.9994 (benchmarks/parity.py).
_MARGIN = 2


def _decode_jpeg_reduced(img: Image.Image, header: _Header, min_size: SizeNeeded) -> np.ndarray | None:
    """Decode a JPEG scaled down in its DCT when it is at least 4x the size needed, else None."""
    width, height = header.width, header.height
    transposed = header.orientation in _TRANSPOSING
    need_h, need_w = min_size(*((width, height) if transposed else (height, width)))
    if transposed:
        need_h, need_w = need_w, need_h
    need_h, need_w = _MARGIN * need_h, _MARGIN * need_w
    if height < 2 * need_h or width < 2 * need_w:
        return None  # no power-of-two reduction fits: decode in full
    img.draft("RGB", (need_w, need_h))  # the largest 1/2, 1/4, 1/8 that stays >= (need_w, need_h)
    return _load_with_pillow(img, header)


def _load_with_pillow(img: Image.Image, header: _Header) -> np.ndarray:
    """Decode an opened (header-checked) image's pixels with Pillow."""
    try:
        with img:
            img.load()
            return _from_pil(img)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _BadImage(_decoder_reason(str(exc), header)) from None
    except MemoryError:
        raise _BadImage(_out_of_memory(header)) from None


def _from_pil(img: Image.Image) -> np.ndarray:
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
    return np.array(rgb, dtype=np.uint8)


def _from_array(arr: np.ndarray) -> np.ndarray:
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
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    import torch

    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.uint16:
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    raise _BadImage(f"unsupported decoded pixel type {image.dtype}")
