"""
Inference engines: the same features, faster, with OpenVINO on the CPU
======================================================================


Usage::

    python examples/plot_engines.py [PHOTOS_DIR] [--out engines.png]

Extracts features from the same JPEG photos with ``engine="torch"`` and
``engine="openvino"`` (and OpenVINO in bfloat16 where the CPU has native
bfloat16), prints images/s and how closely the features agree, and plots both
to engines.png. Photos: PHOTOS_DIR, else the ants and bees photos when they are in
``$SKLTRANSFER_DATA`` (``skltransfer.datasets.fetch_hymenoptera``; never downloaded
here), else 160 crops of the two photos that ship with scikit-learn.
Runs offline.
"""

import argparse
import io
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from skltransfer import PretrainedFeatures, load_image_folder
from skltransfer.datasets import DatasetUnavailableError, fetch_hymenoptera
from skltransfer.runtime import native_bfloat16


parser = argparse.ArgumentParser()
parser.add_argument("photos", nargs="?", type=Path, help="a folder of photos (default: see above)")
parser.add_argument("--out", default="engines.png")
args = parser.parse_args()


def photos() -> list:
    try:  # your photos, else the ants and bees photos if this machine has them (never downloaded here)
        root = args.photos or fetch_hymenoptera(download=False)
    except DatasetUnavailableError:
        root = None
    if root is not None and root.is_dir():
        return load_image_folder(root / "train" if (root / "train").is_dir() else root)[0][:240]
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    images = []
    for _ in range(80):
        for photo in load_sample_images().images:  # two 427 x 640 photos
            top, left = rng.integers(0, 100), rng.integers(0, 200)
            crop = Image.fromarray(photo[top : top + 320, left : left + 420])
            buffer = io.BytesIO()
            crop.save(buffer, "JPEG", quality=90)
            images.append(buffer.getvalue())  # encoded bytes, decoded as files are
    return images


images = photos()
runs = {"torch, float32": ("torch", "float32"), "OpenVINO, float32": ("openvino", "float32")}
if native_bfloat16():
    runs["OpenVINO, bfloat16"] = ("openvino", "bfloat16")

rates, features = {}, {}
for label, (engine, precision) in runs.items():
    extractor = PretrainedFeatures(engine=engine, precision=precision, cache=None).fit(images)
    extractor.transform(images[:12])  # warm-up: model built (converted once for OpenVINO)
    start = time.perf_counter()
    features[label] = extractor.transform(images)
    rates[label] = len(images) / (time.perf_counter() - start)


def cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


reference = features["torch, float32"]
print(f"{len(images)} photos, EfficientNet-Lite0, end to end from JPEG")
for label, rate in rates.items():
    agreement = cosine(features[label], reference)
    print(f"  {label:20s} {rate:6.1f} images/s ({rate / rates['torch, float32']:.1f}x torch); "
          f"cosine to torch float32: min {agreement.min():.6f}")

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
labels = list(rates)
left.barh(labels, [rates[k] for k in labels], color=["#888888", "#1f77b4", "#aec7e8"][: len(labels)])
left.set_xlabel("images / s, end to end")
left.set_title("Speed")
left.invert_yaxis()
bins = np.logspace(-9.5, -1, 35)
for label in labels[1:]:
    distance = np.clip(1 - cosine(features[label], reference), 1e-9, None)  # float rounding: 0 or below
    right.hist(distance, bins=bins, alpha=0.7, label=label)
right.set_xscale("log")
right.set_xlabel("1 - cosine to torch float32 (floored at 1e-9)")
right.set_ylabel("images")
right.set_title("Agreement with torch float32")
right.legend()
fig.tight_layout()
fig.savefig(args.out, dpi=120)
print(f"saved {args.out}")
