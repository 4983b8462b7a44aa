"""
Scoring uploads from strangers: a safe model file, bombs and broken files as error rows
=======================================================================================


Usage::

    python examples/untrusted_uploads.py

Trains a small classifier on crops of the two photos that ship with scikit-learn,
saves it with ``skltransfer.save`` (a file that runs no code when loaded), then
scores an "uploads" folder that also holds a 70-byte PNG claiming 60,000 x 60,000
pixels, a truncated JPEG and a text file named .jpg. The bad files become error
rows with a reason; the good ones are scored. Runs offline, in a temporary folder.
"""

import argparse
import io
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import skltransfer
from skltransfer import PretrainedFeatures
from skltransfer.scoring import score_chunk


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


argparse.ArgumentParser(description="Score uploads from strangers: a safe model file, bombs and broken files as "
                        "error rows (no arguments: runs offline in a temporary folder).").parse_args()
folder = Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
china, flower = load_sample_images().images
X, y = [], []
for label, photo in (("china", china), ("flower", flower)):
    for _ in range(12):
        top, left = rng.integers(0, 150), rng.integers(0, 250)
        X.append(jpeg(photo[top : top + 256, left : left + 384]))
        y.append(label)

clf = make_pipeline(PretrainedFeatures(cache=folder / "cache"), LogisticRegression(max_iter=1000)).fit(X, y)
skltransfer.save(clf, folder / "model.skops")
model = skltransfer.load(folder / "model.skops")  # nothing in the file is run
print(f"saved and loaded {folder / 'model.skops'} ({(folder / 'model.skops').stat().st_size / 1024:.0f} KiB)")

uploads = folder / "uploads"
uploads.mkdir()
(uploads / "temple.jpg").write_bytes(jpeg(china[100:356, 200:584]))
(uploads / "petals.jpg").write_bytes(jpeg(flower[50:306, 100:484]))
(uploads / "bomb.png").write_bytes(png_bomb())
(uploads / "cut.jpg").write_bytes(jpeg(flower[:256, :256])[:1500])
(uploads / "notes.jpg").write_text("not an image\n")

for row in score_chunk(model, sorted(str(p) for p in uploads.iterdir())):
    name = Path(row["path"]).name
    if row["error"]:
        print(f"  {name:11s} error: {row['error']}")
    else:
        print(f"  {name:11s} {row['prediction']} ({row['probability']:.2f})")
print("the same from a shell: skltransfer predict model.skops uploads/ --out predictions.csv (exit code 3)")
shutil.rmtree(folder)  # the model, the uploads and the feature cache made here
