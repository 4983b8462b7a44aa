"""Batch scoring at scale, measured in one run.

1. ``skltransfer predict`` (a subprocess, streaming in chunks) over N images vs the
   in-process Python API (``model.predict_proba(paths)``) on the same images:
   images/s and the ratio (goal >= 0.9x).
2. Peak RSS of ``skltransfer predict`` at 5,000 vs 20,000 images (goal: flat).
3. ``skltransfer.dask.predict`` on a LocalCluster of 2 single-threaded workers vs one
   process on the same images.

The feature cache is off everywhere, so every image really goes through the model.
Images: the flowers5 photos, linked repeatedly under fresh names to reach N.

    python benchmarks/predict.py [--data ../shared/data] [--n 20000] [--n-small 5000] [--n-dask 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from skltransfer import PretrainedFeatures, load_image_folder

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def linked_images(sources: list[str], n: int, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        link = folder / f"{i:06d}.jpg"
        if not link.exists():
            link.symlink_to(sources[i % len(sources)])
        paths.append(str(link))
    return paths


def run_cli(model: Path, folder: Path, out: Path) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one `skltransfer predict` process."""
    command = [sys.executable, "-m", "skltransfer", "predict", str(model), str(folder),
               "--out", str(out), "--no-cache", "--quiet"]
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"skltransfer predict failed: {command}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--n-small", type=int, default=5000)
    parser.add_argument("--n-dask", type=int, default=1000)
    parser.add_argument("--skip-cli", action="store_true", help="only the Dask comparison [3]")
    args = parser.parse_args()
    sources, labels = load_image_folder(args.data / "flowers5")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_pipeline(PretrainedFeatures(cache=None), LogisticRegression(max_iter=1000))
        model.fit(sources[::10], labels[::10])
        if not args.skip_cli:
            cli_vs_api(model, sources, tmp, args)
        dask_vs_one_process(model, linked_images(sources, args.n_dask, tmp / "dask"))
    print(f"machine: {os.cpu_count()} cores; numpy {np.__version__}")


def cli_vs_api(model, sources, tmp: Path, args) -> None:
    model_file = tmp / "model.joblib"
    joblib.dump(model, model_file)
    big = linked_images(sources, args.n, tmp / "big")
    linked_images(sources, args.n_small, tmp / "small")
    small_s, small_rss = run_cli(model_file, tmp / "small", tmp / "small.csv")
    big_s, big_rss = run_cli(model_file, tmp / "big", tmp / "big.csv")
    start = time.perf_counter()
    model.predict_proba(big)
    api_s = time.perf_counter() - start
    print(f"[1] {args.n} images: skltransfer predict {args.n / big_s:.1f} images/s "
          f"(process start included), in-process API {args.n / api_s:.1f} images/s; "
          f"CLI / API = {api_s / big_s:.2f}x (goal >= 0.9x)")
    print(f"[2] peak RSS of skltransfer predict: {small_rss:.0f} MB at {args.n_small} images, "
          f"{big_rss:.0f} MB at {args.n} images ({big_rss / small_rss:.2f}x for {args.n / args.n_small:.0f}x "
          "the images; goal: flat)", flush=True)


def dask_vs_one_process(model, few: list[str]) -> None:
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client, LocalCluster

    import skltransfer.dask as skdask

    start = time.perf_counter()
    model.predict_proba(few)
    one_s = time.perf_counter() - start
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster):
            warm = dd.from_pandas(pd.DataFrame({"path": few[:16]}), npartitions=2)
            skdask.predict(model, warm).compute()  # workers import torch and build the backbone
            frame = dd.from_pandas(pd.DataFrame({"path": few}), npartitions=8)
            start = time.perf_counter()
            result = skdask.predict(model, frame).compute()
            dask_s = time.perf_counter() - start
    assert result["error"].isna().all() and len(result) == len(few)
    print(f"[3] {len(few)} images: one process (2 threads) {len(few) / one_s:.1f} images/s; "
          f"Dask LocalCluster 2 workers x 1 thread {len(few) / dask_s:.1f} images/s "
          f"({one_s / dask_s:.2f}x; workers warmed up first)", flush=True)


if __name__ == "__main__":
    main()
