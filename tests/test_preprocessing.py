"""The eval geometry is timm's: resize, crop or pad as timm's eval transform does, on uint8 tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from _support import make_image
from skltransfer.preprocessing import Preprocessing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("input_size", [(224, 224), (256, 192), (192, 256)])
@pytest.mark.parametrize("image_size", [(300, 500), (500, 300), (120, 120)])
def test_ours_matches_timms_eval_transform(crop_mode, input_size, image_size):
    pixels = make_image(seed=sum(image_size), size=image_size)
    timm_eval = create_transform(input_size=(3, *input_size), crop_pct=0.875, crop_mode=crop_mode,
                                 interpolation="bicubic", mean=MEAN, std=STD)
    expected = timm_eval(Image.fromarray(pixels))
    ours = Preprocessing(input_size, 0.875, crop_mode, "bicubic", MEAN, STD, crop="center")
    got = ours.normalize(ours.resize_crop(torch.from_numpy(pixels).permute(2, 0, 1))[None])[0]
    assert got.shape == expected.shape
    # PIL and torchvision resample a little differently; a misplaced crop or a black border would
    # differ by whole units of the normalised scale.
    assert (got - expected).abs().mean() < 0.03


def test_only_the_configurations_whose_pixels_changed_get_a_new_cache_identity():
    def identity(crop_mode, input_size):
        return Preprocessing(input_size, 0.875, crop_mode, "bicubic", MEAN, STD).as_dict()

    assert "geometry" not in identity("center", (224, 224))  # the default: rows cached before still serve
    assert "geometry" not in identity("squash", (256, 192))
    assert identity("border", (224, 224))["geometry"] == "timm-eval"
    assert identity("center", (256, 192))["geometry"] == "timm-eval"
    np.testing.assert_equal(identity("center", (224, 224))["input_size"], (224, 224))


def test_another_input_size_keeps_the_crop_fraction_and_refuses_what_cannot_run():
    from skltransfer.preprocessing import check_input_size

    p = Preprocessing((224, 224), 0.875, "center", "bicubic", MEAN, STD)
    small = p.with_input_size(128)
    assert small.input_size == (128, 128) and small.crop_pct == p.crop_pct and small.mean == p.mean
    assert p.with_input_size(None) is p
    assert p.with_input_size((160, 128)).input_size == (160, 128)
    assert p.as_dict() != small.as_dict()  # a cache key of its own
    for bad in (16, 0, (128,), (128, 16), 128.0, True, "128"):
        with pytest.raises(ValueError, match="input_size"):
            check_input_size(bad)


def test_auto_input_size_is_smaller_only_where_the_median_image_is_small(tmp_path):
    from PIL import Image

    from _support import encode, make_image
    from skltransfer.preprocessing import auto_input_size

    thumbnails = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    assert auto_input_size(thumbnails, (224, 224)) == (160, 160)
    assert auto_input_size(thumbnails, (224, 288)) == (160, 208)  # the shorter side to 160, the aspect kept
    assert auto_input_size(thumbnails, (160, 160)) is None  # nothing smaller to gain
    photos = [encode(make_image(i, size=(120, 90))) for i in range(5)]
    assert auto_input_size(photos, (224, 224)) is None
    # The median decides: three small of five is small, two of five is not.
    assert auto_input_size(photos[:2] + [encode(make_image(9, size=(24, 64)))] * 3, (224, 224)) == (160, 160)
    assert auto_input_size(photos[:3] + [encode(make_image(9, size=(24, 64)))] * 2, (224, 224)) is None
    # The size as displayed: a JPEG rotated by EXIF is measured after the rotation.
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(make_image(1, size=(40, 200))).save(rotated, exif=exif.tobytes())
    from skltransfer.decoding import try_image_size

    assert try_image_size(rotated) == ((200, 40), None)
    # Unreadable images do not count (decoding names them later); none readable: the weights' size.
    assert auto_input_size([b"junk", tmp_path / "missing.png"] + [encode(thumbnails[0], "PNG")], (224, 224)) \
        == (160, 160)
    assert auto_input_size([b"junk", tmp_path / "missing.png"], (224, 224)) is None
