"""Does the fast path compute the same features as the reference path?

Reference: timm's eval transform on PIL images + the eager fp32 timm model, one image at
a time (the tutorials' path). Ours: PretrainedFeatures with the same geometry
(crop="center": timm's eval crop), uint8 decoding and resizing, batches, channels_last,
tuned allocator. Prints the cosine similarity of every image's two feature rows
(goal >= 0.99 for every image) and LogisticRegression test accuracy on each feature
set (goal: within 1 point), on a stable 80/20 split.

    python benchmarks/parity.py [--data ../shared/data] [--set flowers5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skltransfer import PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.backbones import load_backbone

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def reference_features(paths: list[str]) -> np.ndarray:
    backbone = load_backbone("tf_efficientnet_lite0")
    model = backbone.model.to(memory_format=torch.contiguous_format)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    rows = []
    with torch.inference_mode():
        for p in paths:
            rows.append(model(transform(Image.open(p).convert("RGB"))[None])[0].numpy())
    return np.stack(rows)


def accuracy(X, y, train, test) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5)).fit(X[train], y[train])
    return clf.score(X[test], y[test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--set", default="flowers5")
    args = parser.parse_args()
    paths, labels = load_image_folder(args.data / args.set)
    start = time.perf_counter()
    ours = PretrainedFeatures(crop="center", cache=None).fit(paths).transform(paths)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = reference_features(paths)
    ref_s = time.perf_counter() - start
    cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    _, _, train, test = stable_train_test_split(paths, np.arange(len(paths)), test_size=0.2)
    a_ours, a_ref = accuracy(ours, labels, train, test), accuracy(ref, labels, train, test)
    print(f"{args.set}: {len(paths)} images; cosine(ours, reference): min {cosine.min():.4f}, "
          f"mean {cosine.mean():.5f}, images below 0.99: {(cosine < 0.99).sum()} (goal 0)")
    print(f"LogisticRegression test accuracy: ours {a_ours:.1%}, reference {a_ref:.1%}, "
          f"difference {100 * (a_ours - a_ref):+.1f} points (goal within 1)")
    print(f"time: ours {len(paths) / ours_s:.1f} images/s, reference {len(paths) / ref_s:.1f} images/s")


if __name__ == "__main__":
    main()
