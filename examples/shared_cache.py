"""
A feature cache many machines share: compute on one, read on another
=====================================================================

Two "machines" (two local cache folders, as two nodes of a cluster would have) share one store.
The first computes every image's features once; the second, starting cold, reads them from the
store instead of running the backbone, and keeps them in its own folder, so its next run does not
touch the store at all.

Usage::

    python examples/shared_cache.py [--url s3://bucket/prefix] [--images N]

Without ``--url`` the store is a folder on this disk (``file://...``, a stand-in for S3 that needs
no network). With ``--url s3://...`` it is your bucket: install ``skltransfer[s3]`` and give the
credentials the usual way (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or ``~/.aws``); add
``--endpoint-url`` for MinIO or another S3-compatible server. The images are scikit-learn's
handwritten digits written as PNG files (``skltransfer.datasets.write_digits_folder``).
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from skltransfer import FeatureCache, PretrainedFeatures, load_image_folder
from skltransfer.datasets import write_digits_folder

parser = argparse.ArgumentParser(description="Two machines sharing one feature cache store.")
parser.add_argument("--url", help="the shared store (default: a file:// folder in a temporary directory)")
parser.add_argument("--endpoint-url", help="an S3-compatible server's address (MinIO, ...)")
parser.add_argument("--images", type=int, default=300, help="digits to write and extract (default 300)")
args = parser.parse_args()

work = Path(tempfile.mkdtemp(prefix="skltransfer-shared-"))
url = args.url or (work / "store").as_uri()
options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
paths, _ = load_image_folder(write_digits_folder(work / "digits", args.images))


def machine(name: str) -> FeatureCache:
    """One node: the shared store behind a local folder of its own."""
    return FeatureCache(url, local=work / name, storage_options=options)


def run(name: str) -> None:
    features = PretrainedFeatures(cache=machine(name)).fit(paths)
    start = time.perf_counter()
    features.transform(paths)
    info = features.cache_info_
    print(f"{name:>9}: {info.hits:4d} read, {info.misses:4d} computed in {time.perf_counter() - start:5.2f} s")


print(f"{len(paths)} images; shared store: {url}")
run("machine-a")  # cold everywhere: computes, keeps locally, uploads in batches
run("machine-b")  # a new machine: reads every row from the store
run("machine-b")  # warm: reads its own folder, no request to the store

shared = machine("machine-a").info()["shared"]
print(f"the store holds {shared['rows']} rows in {shared['objects']} objects ({shared['bytes']:,} bytes)")
shutil.rmtree(work)  # the images, both local folders and (without --url) the store; a real store you keep
