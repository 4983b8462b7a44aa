"""Decoding: every input kind becomes the same RGB pixels; bad inputs are named."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from _support import encode, make_image
from skltransfer.decoding import ImageLoadError, as_image_items, decode_rgb


@pytest.fixture
def pixels():
    return make_image(seed=1, size=(30, 44))


def as_hwc(tensor: torch.Tensor) -> np.ndarray:
    assert tensor.dtype == torch.uint8 and tensor.ndim == 3 and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy()


def test_path_bytes_pil_and_array_decode_to_the_same_pixels(tmp_path, pixels):
    data = encode(pixels, "PNG")
    path = tmp_path / "img.png"
    path.write_bytes(data)
    expected = pixels
    for item in (str(path), path, data, bytearray(data), memoryview(data), Image.open(path), pixels):
        np.testing.assert_array_equal(as_hwc(decode_rgb(item)), expected)


@pytest.mark.parametrize(
    "mode, fmt",
    [("L", "PNG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGB", "BMP"),
     ("RGB", "TIFF"), ("RGB", "WEBP"), ("P", "GIF")],
)
def test_every_colour_mode_and_format_becomes_rgb(pixels, mode, fmt):
    data = _encode_pil(Image.fromarray(pixels).convert(mode), fmt)
    out = decode_rgb(data)
    assert out.shape == (3, 30, 44)
    # Pillow's reading of the same bytes is the reference; decoders may round differently.
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    assert np.abs(as_hwc(out).astype(np.int16) - reference).mean() < 2


def _encode_pil(img, fmt):
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def test_grayscale_gives_three_equal_channels(pixels):
    gray = np.asarray(Image.fromarray(pixels).convert("L"))
    out = decode_rgb(_encode_pil(Image.fromarray(gray), "PNG"))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    np.testing.assert_array_equal(out[0].numpy(), gray)


def test_sixteen_bit_png_keeps_the_top_eight_bits():
    values = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0..65535 ramp
    out = decode_rgb(_encode_pil(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(out[0].numpy(), (values >> 8).astype(np.uint8))


def test_exif_orientation_is_applied_to_files_bytes_and_pil(tmp_path, pixels):
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, "JPEG", exif=exif, quality=95)
    for item in (path, path.read_bytes(), Image.open(path)):
        out = decode_rgb(item)
        assert out.shape == (3, 44, 30), type(item)


def test_arrays_gray_rgba_and_stacked_batches(pixels):
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(as_hwc(decode_rgb(rgba)), pixels)
    gray = pixels[..., 0]
    assert decode_rgb(gray).shape == (3, 30, 44)
    stacked = np.stack([pixels, pixels])
    items = as_image_items(stacked)
    assert len(items) == 2 and items[1].shape == pixels.shape
    assert len(as_image_items(np.stack([gray, gray, gray]))) == 3


def test_float_arrays_are_refused_with_the_fix():
    with pytest.raises(ImageLoadError, match="uint8"):
        decode_rgb(np.zeros((4, 4, 3), dtype=np.float64))


@pytest.mark.parametrize("bad", ["a path string", b"raw bytes"])
def test_a_single_item_is_not_a_sequence_of_images(bad):
    with pytest.raises(TypeError, match="wrap it in a list"):
        as_image_items(bad)


def test_a_numeric_table_is_not_images():
    with pytest.raises(TypeError, match=r"\(N, H, W\)"):
        as_image_items(np.zeros((5, 3)))


def _bad_files(tmp_path, pixels):
    good = encode(pixels, "JPEG")
    files = {
        "missing": tmp_path / "does_not_exist.jpg",
        "empty": tmp_path / "empty.jpg",
        "truncated": tmp_path / "truncated.jpg",
        "text": tmp_path / "notes.jpg",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["text"].write_text("this is not an image\n")
    return files


@pytest.mark.parametrize(
    "kind, reason",
    [("missing", "no such file"), ("empty", "empty"), ("truncated", "truncated file: the image data ends early"),
     ("text", "not an image file")],
)
def test_each_bad_file_error_names_the_file_and_the_reason(tmp_path, pixels, kind, reason):
    path = _bad_files(tmp_path, pixels)[kind]
    with pytest.raises(ImageLoadError) as info:
        decode_rgb(path)
    assert str(path) in str(info.value)
    assert reason in str(info.value)
    assert info.value.failures[0].source == str(path)


def test_a_directory_is_named_as_such(tmp_path):
    with pytest.raises(ImageLoadError, match="is a directory"):
        decode_rgb(tmp_path)


# -- JPEGs decoded at the size needed ---------------------------------------------


def _large_jpeg(orientation: int = 1, size=(600, 800)) -> bytes:
    img = Image.fromarray(make_image(seed=3, size=size))
    exif = img.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_reduced_but_never_below_the_size_needed():
    data = _large_jpeg()
    assert decode_rgb(data).shape == (3, 600, 800)
    # Kept at twice the size needed, (140, 190) -> (280, 380): 1/2 is the largest reduction.
    assert decode_rgb(data, lambda h, w: (140, 190)).shape == (3, 300, 400)
    assert decode_rgb(data, lambda h, w: (70, 95)).shape == (3, 150, 200)  # 1/4
    # Less than 4 times the size needed: decoded in full, the same pixels as without a hint.
    assert torch.equal(decode_rgb(data, lambda h, w: (160, 210)), decode_rgb(data))


def test_reduced_decoding_keeps_exif_orientation_and_asks_with_the_displayed_size():
    data = _large_jpeg(orientation=6)  # shown rotated: 800 high, 600 wide
    asked = []

    def needs(height, width):
        asked.append((height, width))
        return 95, 70

    out = decode_rgb(data, needs)
    assert asked == [(800, 600)]
    assert out.shape == (3, 200, 150)


def test_reduced_pixels_are_a_faithful_downscale():
    from skltransfer.preprocessing import Preprocessing

    p = Preprocessing((224, 224), 0.875, "center", "bicubic", (0.5,) * 3, (0.5,) * 3)
    data = _large_jpeg(size=(1100, 1400))
    assert decode_rgb(data, p.resized_size).shape == (3, 550, 700)  # >= twice (256, 325)
    full = p.resize_crop(decode_rgb(data)).float()
    reduced = p.resize_crop(decode_rgb(data, p.resized_size)).float()
    assert reduced.shape == full.shape == (3, 224, 224)
    psnr = 10 * torch.log10(255**2 / ((full - reduced) ** 2).mean())
    assert psnr > 30  # dB, on a noisy image: the same picture, filtered another way


def test_a_truncated_large_jpeg_is_named_as_such_when_decoded_reduced():
    data = _large_jpeg()[:3000]
    with pytest.raises(ImageLoadError, match="truncated file"):
        decode_rgb(data, lambda h, w: (100, 100))
