"""Does the fast path compute the same features as the reference path?

Reference: timm's eval transform on PIL images + the eager fp32 timm model, one image at
a time (the tutorials' path). Ours: PretrainedFeatures with the same geometry
(crop="center": timm's eval crop), uint8 decoding (large JPEGs reduced in libjpeg's DCT),
batches, with each engine (torch: BatchNorm folded, channels_last; openvino: the
converted model, float32 pinned). Also ours from fully decoded pixels, which isolates
what DCT-scaled decoding changes.

For every image: the cosine similarity of its two feature rows (goal >= 0.999), and
LogisticRegression test accuracy on each feature set (goal: within 0.3 points):
flowers5 on a stable 80/20 split, hymenoptera on its own train/test folders.

    python benchmarks/parity.py [--data ../shared/data] [--set flowers5 hymenoptera]
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

from _machine import cpu_model
from skltransfer import PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.backbones import load_backbone
from skltransfer.decoding import decode_rgb

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


def load(data: Path, name: str):
    """Paths, labels and train/test positions."""
    if (data / name / "train").is_dir():
        train_paths, train_labels = load_image_folder(data / name / "train")
        test_paths, test_labels = load_image_folder(data / name / "test")
        paths, labels = train_paths + test_paths, np.concatenate([train_labels, test_labels])
        positions = np.arange(len(paths))
        return paths, labels, positions[: len(train_paths)], positions[len(train_paths):]
    paths, labels = load_image_folder(data / name)
    _, _, train, test = stable_train_test_split(paths, np.arange(len(paths)), test_size=0.2)
    return paths, labels, train, test


def timed(compute) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = compute()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--set", nargs="+", default=["flowers5", "hymenoptera"])
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.set:
        paths, labels, train, test = load(args.data, name)
        ref, ref_s = timed(lambda: reference_features(paths))
        a_ref = accuracy(ref, labels, train, test)
        print(f"{name}: {len(paths)} images; reference {len(paths) / ref_s:.1f} images/s, "
              f"LogisticRegression {a_ref:.1%}")
        full_pixels = [decode_rgb(p).permute(1, 2, 0).numpy() for p in paths]
        runs = {
            "torch": paths,
            "openvino": paths,
            "openvino, full decode": full_pixels,
        }
        for label, X in runs.items():
            engine = label.split(",")[0]
            features = PretrainedFeatures(crop="center", cache=None, engine=engine).fit(X[:1])
            ours, ours_s = timed(lambda: features.transform(X))
            cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
            a_ours = accuracy(ours, labels, train, test)
            print(f"  ours ({label:21s}): cosine min {cosine.min():.5f} mean {cosine.mean():.6f}, "
                  f"below 0.999: {(cosine < 0.999).sum()} (goal 0); accuracy {a_ours:.1%} "
                  f"({100 * (a_ours - a_ref):+.1f} points, goal within 0.3); {len(paths) / ours_s:.1f} images/s")


if __name__ == "__main__":
    main()
