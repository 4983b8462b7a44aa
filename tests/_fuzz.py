"""Mutated image files for fuzzing the decoding path (used by the tests and benchmarks/fuzz_decoding.py).

Seeds are real files of six formats written by Pillow's encoders; each case is
one seed mutated with a fixed random seed: bit flips, truncation, a header
field set to an extreme value (with the checksum fixed where the format has
one, so the value reaches the decoder), or a chunk of bytes duplicated.

``python tests/_fuzz.py N SEED`` runs N cases through ``PretrainedFeatures``
(the tiny test backbone, torch engine, no cache) in this process and prints
one JSON line of counts; a crash or hang shows as the process dying, which
the caller observes from outside.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")
MUTATIONS = ("bitflip", "truncate", "extreme_header", "duplicate_chunk")
EXTREMES = (0, 1, 0xFFFF, 60_000, 0x7FFF_FFFF, 0xFFFF_FFFF)


def seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    pixels = np.clip(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1) + rng.normal(0, 12, (48, 64, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    files = {}
    for fmt in FORMATS:
        buffer = io.BytesIO()
        (image.convert("P") if fmt == "GIF" else image).save(buffer, fmt)
        files[fmt] = buffer.getvalue()
    return files


def _png_fix_crc(data: bytearray) -> None:
    """Recompute every chunk's CRC, so that a changed field reaches the decoder."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 8 + length
        if end + 4 > len(data):
            return
        data[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(data[pos + 4 : end])))
        pos = end + 4


def _size_fields(data: bytes, fmt: str) -> list[tuple[int, str]]:
    """(offset, struct format) of the width / height fields in a seed's header."""
    if fmt == "PNG":
        return [(16, ">I"), (20, ">I")]
    if fmt == "GIF":
        fields = [(6, "<H"), (8, "<H")]
        descriptor = data.find(b"\x2c", 13)
        if descriptor > 0:
            fields += [(descriptor + 5, "<H"), (descriptor + 7, "<H")]
        return fields
    if fmt == "BMP":
        return [(18, "<i"), (22, "<i")]
    if fmt == "JPEG":
        sof = data.find(b"\xff\xc0")
        return [(sof + 5, ">H"), (sof + 7, ">H")] if sof > 0 else []
    if fmt == "WEBP":
        vp8 = data.find(b"VP8 ")
        return [(vp8 + 14, "<H"), (vp8 + 16, "<H")] if vp8 > 0 else []
    if fmt == "TIFF":  # tags 256 (width) and 257 (height) in the first IFD
        (ifd,) = struct.unpack("<I", data[4:8])
        (count,) = struct.unpack("<H", data[ifd : ifd + 2])
        fields = []
        for i in range(count):
            entry = ifd + 2 + 12 * i
            tag, kind = struct.unpack("<HH", data[entry : entry + 4])
            if tag in (256, 257):
                fields.append((entry + 8, "<H" if kind == 3 else "<I"))
        return fields
    return []


def mutate(data: bytes, fmt: str, kind: str, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    if kind == "bitflip":
        for _ in range(int(rng.integers(1, 9))):
            position = int(rng.integers(0, len(out)))
            out[position] ^= 1 << int(rng.integers(0, 8))
    elif kind == "truncate":
        out = out[: int(rng.integers(1, len(out)))]
    elif kind == "extreme_header":
        fields = _size_fields(data, fmt)
        for offset, code in [fields[int(i)] for i in rng.choice(len(fields), size=min(2, len(fields)), replace=False)]:
            limit = {"H": 0xFFFF, "I": 0xFFFF_FFFF, "i": 0x7FFF_FFFF}[code[-1]]
            value = min(int(rng.choice(EXTREMES)), limit)
            if code.endswith("i") and rng.random() < 0.3:
                value = -value
            struct.pack_into(code, out, offset, value)
        if fmt == "PNG":
            _png_fix_crc(out)
    elif kind == "duplicate_chunk":
        start = int(rng.integers(0, len(out)))
        length = int(rng.integers(1, min(256, len(out) - start) + 1))
        at = int(rng.integers(0, len(out)))
        out[at:at] = out[start : start + length] * int(rng.integers(1, 4))
    return bytes(out)


def cases(n: int, seed: int = 0):
    """(format, mutation, bytes) for n cases, the same for the same seed."""
    rng = np.random.default_rng(seed)
    seeds = seed_files()
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        kind = MUTATIONS[(i // len(FORMATS)) % len(MUTATIONS)]
        yield fmt, kind, mutate(seeds[fmt], fmt, kind, rng)


def run(n: int, seed: int = 0) -> dict:
    """Each case through PretrainedFeatures.transform: features or a named ImageLoadError."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from skltransfer import ImageLoadError, PretrainedFeatures

    features = PretrainedFeatures("test_efficientnet", weights=None, cache=None, engine="torch")
    features.fit([np.zeros((8, 8, 3), np.uint8)])
    counts = {"cases": 0, "features": 0, "named_errors": 0, "unnamed": [], "reasons": {}}
    slowest = 0.0
    for fmt, kind, data in cases(n, seed):
        counts["cases"] += 1
        start = time.perf_counter()
        try:
            row = features.transform([data])
            assert row.shape == (1, features.n_features_out_) and np.isfinite(row).all()
            counts["features"] += 1
        except ImageLoadError as exc:
            reason = exc.failures[0].reason
            counts["named_errors"] += 1
            category = reason.split(" (")[0].split(":")[0]
            counts["reasons"][category] = counts["reasons"].get(category, 0) + 1
            if ".cpp" in reason or "line " in reason:
                counts["unnamed"].append(f"{fmt} {kind}: {reason}")
        slowest = max(slowest, time.perf_counter() - start)
    counts["slowest_case_s"] = round(slowest, 3)
    counts["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return counts


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)))
