"""The feature cache, measured in one run.

1. Cold vs warm ``transform`` of the same images (default: 4,000 flowers5 photos):
   the ratio and warm images/s.
2. ``GridSearchCV`` over 2 backbones x 3 heads x 5 folds (n_jobs=2) on a fresh cache,
   vs the floor: 2 cold extractions + the same 3 heads x 5 folds fitted on the features.
   Each starts with no joblib worker processes (as a user's first search does): the
   floor's workers import scikit-learn, the search's also torch, torchvision and timm
   (about 2.5 s on 2 cores), which counts as the search's overhead.
3. Disk bytes per cached image.

    python benchmarks/cache.py [--data ../shared/data] [--n-warm 4000] [--n-search 600]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC

from skltransfer import FeatureCache, PretrainedFeatures, load_image_folder

# scikit-learn 1.9 deprecates SVC(probability=True), the head the issue names; quiet
# its warning here and in the loky workers (which inherit the environment).
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADS = [LogisticRegression(max_iter=1000), MLPClassifier(max_iter=500, random_state=0), SVC(probability=True)]


def subset(paths, labels, n):
    order = np.random.default_rng(0).permutation(len(paths))[:n]
    return [paths[i] for i in sorted(order)], labels[sorted(order)]


def warm_vs_cold(paths) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        f = PretrainedFeatures(cache=tmp).fit(paths)
        start = time.perf_counter()
        cold = f.transform(paths)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = PretrainedFeatures(cache=tmp).fit(paths).transform(paths)  # a new estimator
        warm_s = time.perf_counter() - start
        assert np.array_equal(cold, warm)
        info = FeatureCache(tmp).info()
    print(f"[1] cold transform: {len(paths)} images in {cold_s:.1f} s ({len(paths) / cold_s:.1f} images/s)")
    print(f"    warm transform: {warm_s * 1000:.0f} ms ({len(paths) / warm_s:,.0f} images/s, "
          f"goal >= 10,000); warm is {cold_s / warm_s:,.0f}x faster than cold (goal >= 200x)")
    print(f"[3] disk: {info['disk_bytes'] / info['entries']:,.0f} bytes per cached image "
          f"({info['feature_bytes'] / info['entries']:,.0f} of them the float32 features)")


def no_worker_processes() -> None:
    """Stop joblib's reusable worker pool, so the next measurement starts its own."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def search_vs_floor(paths, y, backbones) -> None:
    grid_params = {"features__backbone": backbones, "clf": HEADS}
    no_worker_processes()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline([("features", PretrainedFeatures(cache=tmp)), ("clf", HEADS[0])])
        start = time.perf_counter()
        search = GridSearchCV(pipe, grid_params, cv=5, n_jobs=2).fit(paths, y)
        search_s = time.perf_counter() - start
    no_worker_processes()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_s = 0.0
        for name in backbones:
            t = time.perf_counter()
            X = PretrainedFeatures(name, cache=tmp).fit_transform(paths)
            extract_s += time.perf_counter() - t
            GridSearchCV(Pipeline([("clf", HEADS[0])]), {"clf": HEADS}, cv=5, n_jobs=2).fit(X, y)
        floor_s = time.perf_counter() - start
    fits = len(backbones) * len(HEADS) * 5
    print(f"[2] search {len(backbones)} backbones x {len(HEADS)} heads x 5 folds ({fits} fits, "
          f"n_jobs=2) on {len(paths)} images: {search_s:.1f} s; best {search.best_params_['features__backbone']} "
          f"+ {type(search.best_params_['clf']).__name__}: {search.best_score_:.1%}")
    print(f"    floor (2 cold extractions {extract_s:.1f} s + heads on features {floor_s - extract_s:.1f} s): {floor_s:.1f} s; "
          f"search / floor = {search_s / floor_s:.2f}x (goal <= 1.2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n-warm", type=int, default=4000)
    parser.add_argument("--n-search", type=int, default=600)
    parser.add_argument("--backbones", nargs=2, default=["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
    args = parser.parse_args()
    paths, labels = load_image_folder(args.data / "flowers5")
    warm_vs_cold(subset(paths, labels, args.n_warm)[0])
    search_vs_floor(*subset(paths, labels, args.n_search), args.backbones)


if __name__ == "__main__":
    main()
