"""Frozen default-backbone features + LogisticRegression on the shared photo sets.

Prints, for each data set: test accuracy and end-to-end images/s (decoding,
backbone and head: ``Pipeline.fit`` on the training images plus ``predict``
on the test images, all measured in this one run).

    python benchmarks/baseline_accuracy.py [--data ../shared/data] [--backbone NAME]

hymenoptera uses its train/ and test/ folders; flowers5 has no split, so it
gets a stable 80/20 split by a hash of each file name.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.pipeline import make_pipeline

from skltransfer import PretrainedFeatures, load_image_folder, stable_train_test_split

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def splits(root: Path, name: str):
    if name == "hymenoptera":
        train, y_train = load_image_folder(root / name / "train")
        test, y_test = load_image_folder(root / name / "test")
        return train, test, y_train, y_test
    paths, labels = load_image_folder(root / name)
    return stable_train_test_split(paths, labels, test_size=0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--sets", nargs="+", default=["hymenoptera", "flowers5"])
    args = parser.parse_args()
    print(f"backbone={args.backbone} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()} cuda={torch.cuda.is_available()}")
    print(f"{'data set':<12} {'train':>6} {'test':>6} {'accuracy':>9} {'images/s':>9} {'seconds':>8}")
    for name in args.sets:
        if not (args.data / name).is_dir():
            print(f"{name:<12} skipped: {args.data / name} not found")
            continue
        train, test, y_train, y_test = splits(args.data, name)
        # cache=None: every image goes through the backbone (this measures computation).
        clf = make_pipeline(PretrainedFeatures(args.backbone, cache=None), LogisticRegression(max_iter=1000))
        start = time.perf_counter()
        clf.fit(train, y_train)
        predicted = clf.predict(test)
        seconds = time.perf_counter() - start
        n = len(train) + len(test)
        print(f"{name:<12} {len(train):>6} {len(test):>6} {accuracy_score(y_test, predicted):>9.1%} "
              f"{n / seconds:>9.1f} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
