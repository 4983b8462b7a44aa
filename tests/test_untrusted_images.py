"""Images made to hurt: pixel limits from the header, readable reasons, nothing computed is lost."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image

from _support import TINY, encode, make_image
from skltransfer import FineTuneClassifier, ImageLoadError, PretrainedFeatures
from skltransfer.decoding import DEFAULT_MAX_IMAGE_PIXELS, decode_rgb


def png_claiming(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header claims width x height pixels (valid CRCs, one tiny IDAT)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG with its frame header's size set to width x height."""
    data = bytearray(encode(make_image(0, size=(16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_the_default_limit_is_pillows_decompression_bomb_limit():
    assert DEFAULT_MAX_IMAGE_PIXELS == 2 * Image.MAX_IMAGE_PIXELS == 178_956_970


@pytest.mark.parametrize("make", [png_claiming, jpeg_claiming])
def test_a_huge_header_is_refused_before_decoding_with_its_size_and_the_limit(make, tmp_path):
    path = tmp_path / "bomb.img"
    path.write_bytes(make(60_000, 60_000))
    with pytest.raises(ImageLoadError) as info:
        decode_rgb(path)
    message = str(info.value)
    assert str(path) in message
    assert "60000 x 60000 = 3,600,000,000" in message and "178,956,970" in message
    assert "max_image_pixels" in message  # how to raise it


def test_the_limit_is_settable_and_applies_to_every_input_kind():
    pixels = make_image(1, size=(40, 50))  # 2,000 pixels
    for item in (encode(pixels, "PNG"), encode(pixels, "JPEG"), Image.fromarray(pixels), pixels):
        with pytest.raises(ImageLoadError, match="40 x 50|50 x 40"):
            decode_rgb(item, max_pixels=1_999)
        assert decode_rgb(item, max_pixels=2_000).shape == (3, 40, 50)


def test_a_limit_above_pillows_own_is_honoured_and_pillow_is_left_as_it_was():
    before = Image.MAX_IMAGE_PIXELS
    data = png_claiming(20_000, 10_000)  # 200 M pixels: over Pillow's limit, under ours
    with pytest.raises(ImageLoadError) as info:
        decode_rgb(data, max_pixels=300_000_000)
    assert "too many pixels" not in str(info.value)  # got past the header check to the decoder
    assert Image.MAX_IMAGE_PIXELS == before


def test_decoder_errors_read_as_reasons_not_source_lines():
    good = encode(make_image(2, size=(64, 64)), "PNG")
    at = good.index(b"IDAT") + 20
    broken = good[:at] + bytes(range(64)) + good[at + 64 :]  # compressed pixels overwritten
    for data in (good[: len(good) // 2], broken, encode(make_image(2), "JPEG")[:200]):
        with pytest.raises(ImageLoadError) as info:
            decode_rgb(data)
        reason = info.value.failures[0].reason
        assert reason.startswith(("truncated file", "corrupt PNG data", "corrupt JPEG data"))
        assert ".cpp" not in reason and "line " not in reason


def test_a_bomb_among_good_images_costs_only_itself(tmp_path):
    good = [encode(make_image(i), "JPEG") for i in range(5)]
    cache = tmp_path / "c"
    features = PretrainedFeatures(TINY, weights=None, cache=cache, engine="torch").fit(good)
    with pytest.raises(ImageLoadError) as info:
        features.transform(good[:2] + [png_claiming(60_000, 60_000)] + good[2:])
    assert [f.index for f in info.value.failures] == [2]
    features.transform(good)  # the good rows were computed and kept
    assert features.cache_info_.hits == 5


def test_both_estimators_take_the_limit(tmp_path):
    images = [make_image(i, size=(40, 50)) for i in range(4)]
    small_limit = 1_000
    with pytest.raises(ImageLoadError, match="over the limit of 1,000"):
        PretrainedFeatures(TINY, weights=None, cache=None, max_image_pixels=small_limit).fit_transform(images)
    clf = FineTuneClassifier(TINY, weights=None, epochs=1, max_image_pixels=small_limit, random_state=0)
    with pytest.raises(ImageLoadError, match="over the limit of 1,000"):
        clf.fit(images, [0, 1, 0, 1])
    clf.set_params(max_image_pixels=None).fit(images, [0, 1, 0, 1])
    assert clf.predict(images).shape == (4,)


def test_cli_predict_writes_an_error_row_for_a_bomb_and_goes_on(image_folder, tmp_path):
    from skltransfer.cli import main

    model = tmp_path / "model.skops"
    assert main(["train", str(image_folder), "--backbone", TINY, "--weights", "none", "--out", str(model),
                 "--no-cache", "--quiet"]) == 0
    (image_folder / "red" / "bomb.png").write_bytes(png_claiming(60_000, 60_000))
    out = tmp_path / "p.csv"
    assert main(["predict", str(model), str(image_folder), "--no-cache", "--quiet", "--out", str(out)]) == 3
    rows = out.read_text().strip().splitlines()
    assert len(rows) == 1 + 17
    (bomb,) = [row for row in rows if "bomb.png" in row]
    assert "too many pixels" in bomb and "60000 x 60000" in bomb
