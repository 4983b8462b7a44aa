"""A feature cache a cluster shares: GridSearchCV on Dask, four workers, one S3 store.

A Dask ``LocalCluster`` of 4 worker processes, each with its own empty local
cache folder (four machines in miniature; the client, which refits the best
pipeline, has a fifth), one S3 endpoint (moto's server on 127.0.0.1, behind a
relay that can cut it off): ``GridSearchCV`` over 2 backbones x 3 heads x 5
folds on 2,000 flowers5 images through joblib's Dask backend.

1. **today**: each worker's own local cache, no shared store. Images
   computed per backbone: the rows of the workers' local caches.
2. **shared, cold**: one empty store. Images computed per backbone: the rows
   written to the store (a row computed twice is written twice). Goal: the
   number of images.
3. **warm rerun**: 4 fresh local folders; every worker reads all 2,000
   images' rows of both backbones from the store at once. Goal: >= 5,000
   images/s in all. Then the search again: nothing computed.
4. **the store stopped mid-run**: a fresh store prefix and fresh folders; the
   relay is cut once the first rows are in the store. Goals: the search
   finishes with the same best score, one warning per worker process, the
   rows computed meanwhile are kept locally; the next run (with the store
   back) fills the store with every image.

Run: ``python benchmarks/cluster_cache.py [--images 2000]``; it writes
``benchmarks/results/cluster_cache.json`` and ``.md`` (docs/cache.md includes
the table). Needs the shared data, ``moto[server]``, ``s3fs`` and Dask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the S3 endpoint the tests use: tests/_s3.py

import joblib  # noqa: E402
import numpy as np  # noqa: E402
from _machine import cpu_model  # noqa: E402
from _s3 import BUCKET, CREDENTIALS, Gate, S3Server  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

from skltransfer import FeatureCache, PretrainedFeatures, load_image_folder  # noqa: E402
from skltransfer.objectstore import ObjectStore  # noqa: E402

BACKBONES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
WORKERS = 4
DATA = Path(os.environ.get("SKLTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "flowers5"


def images(n: int) -> tuple[list[str], np.ndarray]:
    """n flowers5 images, the same share of each class, in a stable order."""
    paths, labels = load_image_folder(DATA)
    classes = sorted(set(labels))
    keep = [i for c in classes for i in [j for j, y in enumerate(labels) if y == c][: n // len(classes)]]
    return [paths[i] for i in keep], np.asarray([labels[i] for i in keep])


def search(cache) -> GridSearchCV:
    pipeline = Pipeline([("features", PretrainedFeatures(cache=cache)), ("head", LogisticRegression())])
    grid = {"features__backbone": BACKBONES,
            "head": [LogisticRegression(max_iter=1000), MLPClassifier(max_iter=300, random_state=0), SVC()]}
    return GridSearchCV(pipeline, grid, cv=StratifiedKFold(5, shuffle=True, random_state=0))


# -- run on the workers (shipped by value: the workers cannot import this file) --------------------------


def _use_folder(folder: str) -> None:
    os.environ["SKLTRANSFER_CACHE_DIR"] = folder


def _warnings_given() -> int:
    from skltransfer import cache

    return len(cache._WARNED)


def _store_back() -> None:
    """What a later run sees: no pause left from the outage (a new process would have none)."""
    from skltransfer import cache

    cache._OUTAGES.clear()


def _read_all(paths: list[str], cache) -> float:
    """Seconds this worker takes to get every row of both backbones (all from the store: its folder is new)."""
    start = time.perf_counter()
    for backbone in BACKBONES:
        f = PretrainedFeatures(backbone, cache=cache).fit(paths[:1])
        f.transform(paths)
        assert f.cache_info_.misses == 0, f.cache_info_
    return time.perf_counter() - start


def _unshared() -> int:
    return FeatureCache().info()["unshared"]


# -- the runs ------------------------------------------------------------------------------------


def fresh_folders(client: Client, base: Path, run: str) -> None:
    for i, worker in enumerate(client.scheduler_info()["workers"]):
        client.run(_use_folder, str(base / run / f"worker{i}"), workers=[worker])
    _use_folder(str(base / run / "client"))


def grid_fit(client: Client, cache, paths, labels) -> tuple[GridSearchCV, float]:
    grid = search(cache)
    start = time.perf_counter()
    with joblib.parallel_backend("dask"):
        grid.fit(paths, labels)
    return grid, time.perf_counter() - start


def local_rows(base: Path, run: str) -> int:
    return sum(FeatureCache(base / run / f"worker{i}").info()["entries"] for i in range(WORKERS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--skip-today", action="store_true", help="skip run 1 (the local-only comparison)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "cluster_cache.json")
    args = parser.parse_args()
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    os.environ.update(CREDENTIALS)  # moto's made-up keys, for the workers too (they inherit the environment)
    paths, labels = images(args.images)
    n = len(paths)
    results = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "command": " ".join(["python", *sys.argv]),
               "images": n, "backbones": BACKBONES, "workers": WORKERS}
    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3, \
            LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        base = Path(tmp)
        gate = Gate(s3.port)
        options = {"endpoint_url": gate.endpoint}

        def shared(prefix):
            return FeatureCache(f"s3://{BUCKET}/{prefix}", storage_options=options)

        if not args.skip_today:
            fresh_folders(client, base, "today")
            grid, seconds = grid_fit(client, "auto", paths, labels)
            results["today"] = {"seconds": seconds, "computed": local_rows(base, "today"),
                                "best_score": grid.best_score_}
            print("today:", results["today"], flush=True)

        fresh_folders(client, base, "cold")
        cold, seconds = grid_fit(client, shared("cold"), paths, labels)
        cold_store = ObjectStore(f"s3://{BUCKET}/cold", options)
        by_config = cold_store.info()["rows_by_configuration"]
        results["distinct_images"] = len(cold_store.keys(next(iter(by_config))))  # identical files share a key
        results["cold"] = {"seconds": seconds, "computed_per_backbone": sorted(by_config.values()),
                           "best_score": cold.best_score_, "best_params": str(cold.best_params_)}
        print("cold:", results["cold"], flush=True)

        fresh_folders(client, base, "warm")
        futures = [client.submit(_read_all, paths, shared("cold"), workers=[w], pure=False)
                   for w in client.scheduler_info()["workers"]]
        start = time.perf_counter()
        per_worker = client.gather(futures)
        wall = time.perf_counter() - start
        rows_read = WORKERS * len(BACKBONES) * n
        fresh_folders(client, base, "warm-search")
        warm, seconds = grid_fit(client, shared("cold"), paths, labels)
        after = ObjectStore(f"s3://{BUCKET}/cold", options).info()["rows_by_configuration"]
        results["warm"] = {"rows_read": rows_read, "seconds": wall, "images_per_second": rows_read / wall,
                           "worker_seconds": per_worker, "search_seconds": seconds,
                           "search_computed": sum(after.values()) - sum(by_config.values()),
                           "best_score": warm.best_score_}
        print("warm:", results["warm"], flush=True)

        fresh_folders(client, base, "fault")
        store = ObjectStore(f"s3://{BUCKET}/fault", options)
        cut = {}

        def cut_when_rows_arrive():
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline and not cut:
                info = store.info()
                if info["rows"] > 0:
                    gate.close()
                    cut.update(rows=info["rows"], at=time.perf_counter())
                    return
                time.sleep(0.5)

        watcher = threading.Thread(target=cut_when_rows_arrive, daemon=True)
        start = time.perf_counter()
        watcher.start()
        faulted, seconds = grid_fit(client, shared("fault"), paths, labels)
        watcher.join(5)
        warned = client.run(_warnings_given)
        unshared = client.run(_unshared)
        gate.open()
        client.run(_store_back)
        _store_back()
        before = sum(len(store.keys(c)) for c in store.info()["rows_by_configuration"])
        refill, refill_seconds = grid_fit(client, shared("fault"), paths, labels)
        configs = store.info()["rows_by_configuration"]
        results["fault"] = {"cut_after_rows": cut.get("rows"), "cut_after_seconds": cut.get("at", start) - start,
                            "seconds": seconds, "best_score": faulted.best_score_,
                            "best_params": str(faulted.best_params_),
                            "warnings_per_worker": sorted(warned.values()),
                            "kept_locally_unshared": sum(unshared.values()),
                            "distinct_in_store_after_fault": before,
                            "next_run_seconds": refill_seconds,
                            "distinct_per_backbone_after_next_run": sorted(len(store.keys(c)) for c in configs),
                            "next_run_best_score": refill.best_score_}
        print("fault:", results["fault"], flush=True)
        gate.stop()

    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    args.results.with_suffix(".md").write_text(as_markdown(results))
    print(f"results: {args.results} (and {args.results.with_suffix('.md').name})")


def as_markdown(r: dict) -> str:
    """The table docs/cache.md includes (written by this script, never by hand)."""
    n, cold, warm, fault = r["images"], r["cold"], r["warm"], r["fault"]
    lines = [
        f"| {r['workers']} Dask workers, {n:,} images ({r['distinct_images']:,} distinct: some files are copies), "
        f"{len(r['backbones'])} backbones x 3 heads x 5 folds | figure |",
        "|---|---|",
    ]
    if "today" in r:
        today = r["today"]
        lines.append(f"| images computed per backbone, each worker's own local cache | "
                     f"{today['computed'] / len(r['backbones']):,.0f} "
                     f"({today['computed'] / len(r['backbones']) / r['distinct_images']:.2f}x the distinct images); "
                     f"search {today['seconds']:.0f} s |")
    lines += [
        f"| images computed per backbone, one shared S3 store | "
        f"{' / '.join(f'{c:,}' for c in cold['computed_per_backbone'])}; search {cold['seconds']:.0f} s |",
        f"| warm rerun, 4 fresh local caches: rows read from the store | "
        f"{warm['rows_read']:,} in {warm['seconds']:.1f} s = **{warm['images_per_second']:,.0f} images/s** in all |",
        f"| warm rerun: the search on 4 fresh local caches | {warm['search_computed']} images computed; "
        f"{warm['search_seconds']:.0f} s |",
        f"| store cut off after its first {fault['cut_after_rows']:,} rows: best score (cold run's) | "
        f"{fault['best_score']:.4f} ({cold['best_score']:.4f}) |",
        f"| store cut off: warnings per worker process | {', '.join(map(str, fault['warnings_per_worker']))} |",
        f"| store cut off: rows kept locally, waiting for the store | {fault['kept_locally_unshared']:,} |",
        f"| next run, store back: distinct images in the store per backbone | "
        f"{' / '.join(f'{c:,}' for c in fault['distinct_per_backbone_after_next_run'])} "
        f"(before: {fault['distinct_in_store_after_fault']:,} in all) |",
        "",
        f"Machine: {r['machine']}, no GPU; the store: moto's S3 server on 127.0.0.1. "
        f"Command: `{r['command'].strip()}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
