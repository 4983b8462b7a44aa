"""The feature cache: content-addressed, shared by processes, crash-safe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC
from torch import nn

from _support import TINY, encode, make_image
from skltransfer import FeatureCache, ImageLoadError, PretrainedFeatures, load_image_folder


def cached(cache_dir, **params) -> PretrainedFeatures:
    return PretrainedFeatures(**{"backbone": TINY, "weights": None, "cache": cache_dir, **params})


def test_hits_are_bit_identical_to_fresh_features(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    fresh = cached(None).fit(paths).transform(paths)
    f = cached(tmp_path / "c").fit(paths)
    first = f.transform(paths)
    assert (f.cache_info_.hits, f.cache_info_.misses) == (0, len(paths))
    second = f.transform(paths)
    assert (f.cache_info_.hits, f.cache_info_.misses) == (len(paths), 0)
    np.testing.assert_array_equal(first, fresh)
    np.testing.assert_array_equal(second, fresh)


def test_only_new_images_are_computed(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    f = cached(tmp_path / "c").fit(paths)
    f.transform(paths[:10])
    f.transform(paths)
    assert (f.cache_info_.hits, f.cache_info_.misses) == (10, len(paths) - 10)


def test_a_moved_file_hits_and_a_file_changed_in_place_misses(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    f = cached(tmp_path / "c").fit(paths)
    before = f.transform(paths[:1])
    moved = tmp_path / "elsewhere" / "renamed.jpg"
    moved.parent.mkdir()
    shutil.move(paths[0], moved)
    np.testing.assert_array_equal(f.transform([moved]), before)
    assert f.cache_info_.hits == 1
    moved.write_bytes(encode(make_image(seed=999), "JPEG"))  # new content, same name
    f.transform([moved])
    assert f.cache_info_.misses == 1


def test_an_unchanged_file_is_found_by_path_size_and_mtime_without_reading_it(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    f = cached(tmp_path / "c").fit(paths)
    f.transform(paths[:1])
    stat = os.stat(paths[0])
    # Replace the bytes behind the path's back, keeping size and mtime: only
    # a cache that re-reads the file would notice.
    data = bytearray(open(paths[0], "rb").read())
    data[-3] ^= 0xFF
    with open(paths[0], "wb") as out:
        out.write(data)
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    f.transform(paths[:1])
    assert f.cache_info_.hits == 1


def test_configuration_is_part_of_the_key(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    cached(tmp_path / "c").fit(paths).transform(paths)
    other = cached(tmp_path / "c", pooling="max").fit(paths)
    other.transform(paths)
    assert other.cache_info_.hits == 0
    smaller = cached(tmp_path / "c", input_size=64).fit(paths)
    smaller.transform(paths)  # rows at another input size are other numbers
    assert smaller.cache_info_.hits == 0
    again = cached(tmp_path / "c", batch_size=3, verbose=False).fit(paths)
    again.transform(paths)  # batch size and verbosity do not change the numbers
    assert again.cache_info_.misses == 0


class CountingBackbone(nn.Module):
    """Records how many images go through each backbone (shared across clones)."""

    seen: dict[str, int] = {}

    def __init__(self, name: str, channels: int):
        super().__init__()
        self.name = name
        torch.manual_seed(channels)
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, stride=4), nn.ReLU())

    def forward(self, x):
        CountingBackbone.seen[self.name] = CountingBackbone.seen.get(self.name, 0) + x.shape[0]
        return self.body(x)


def test_search_over_2_backbones_3_heads_5_folds_runs_each_image_once_per_backbone(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    CountingBackbone.seen.clear()
    pipe = Pipeline([("features", PretrainedFeatures(cache=tmp_path / "c")), ("clf", LogisticRegression())])
    grid = GridSearchCV(
        pipe,
        {
            "features__backbone": [CountingBackbone("a", 8), CountingBackbone("b", 12)],
            "clf": [LogisticRegression(max_iter=500), KNeighborsClassifier(3), SVC()],
        },
        cv=KFold(5, shuffle=True, random_state=0),
    ).fit(paths, labels)
    assert grid.best_score_ > 0.8
    # Each backbone is built once (its clones share it), with one zero-image
    # shape probe; beyond that every image went through it exactly once.
    assert CountingBackbone.seen == {"a": len(paths) + 1, "b": len(paths) + 1}


def test_gridsearch_with_two_loky_workers_shares_the_cache(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    pipe = Pipeline([("features", cached(tmp_path / "c")), ("clf", LogisticRegression(max_iter=500))])
    grid = GridSearchCV(pipe, {"clf__C": [0.1, 1.0, 10.0]}, cv=4, n_jobs=2).fit(paths, labels)
    assert grid.best_score_ > 0.8
    f = cached(tmp_path / "c").fit(paths)
    f.transform(paths)
    assert f.cache_info_.misses == 0
    assert FeatureCache(tmp_path / "c").info()["entries"] == len(paths)


def test_bad_images_are_named_and_good_ones_are_kept(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    missing = str(tmp_path / "gone.jpg")
    X = paths[:5] + [missing] + paths[5:9]
    f = cached(tmp_path / "c", batch_size=2).fit(X)
    with pytest.raises(ImageLoadError, match="gone.jpg") as info:
        f.transform(X)
    assert [x.index for x in info.value.failures] == [5]
    f.transform(paths[:9])
    assert f.cache_info_.misses == 0  # everything computed before the error was kept


def test_a_damaged_row_is_recomputed_never_returned(image_folder, tmp_path):
    import sqlite3

    paths, _ = load_image_folder(image_folder)
    f = cached(tmp_path / "c").fit(paths)
    expected = f.transform(paths[:3])
    db = FeatureCache(tmp_path / "c").path
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE features SET vec = zeroblob(LENGTH(vec))")  # crc no longer matches
    np.testing.assert_array_equal(f.transform(paths[:3]), expected)
    assert f.cache_info_.misses == 3


def test_a_corrupt_cache_file_is_detected_and_rebuilt(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    expected = cached(None).fit(paths).transform(paths[:4])
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    db = FeatureCache(cache_dir).path
    db.write_bytes(b"SQLite format 3\x00" + os.urandom(5000))  # truncated garbage
    f = cached(cache_dir).fit(paths)
    np.testing.assert_array_equal(f.transform(paths[:4]), expected)
    assert list(cache_dir.glob("*.corrupt-*")), "the damaged file is kept aside for inspection"
    f.transform(paths[:4])
    assert f.cache_info_.hits == 4


def test_size_limit_evicts_least_recently_used(tmp_path):
    row_bytes = 4 * 100
    store = FeatureCache(tmp_path / "c", max_bytes=10 * row_bytes)  # room for 10 rows
    for i in range(10):
        store.put("cfg", [bytes([i])], np.full((1, 100), i, np.float32))
    assert store.info()["entries"] == 10  # at the limit, nothing evicted
    store.get("cfg", [bytes([0])], 100)  # row 0: the oldest, but just used
    for i in range(10, 13):
        store.put("cfg", [bytes([i])], np.full((1, 100), i, np.float32))
    assert store.info()["feature_bytes"] <= 10 * row_bytes
    kept = store.get("cfg", [bytes([i]) for i in range(13)], 100)
    assert bytes([0]) in kept and bytes([12]) in kept
    assert bytes([1]) not in kept and bytes([2]) not in kept  # least recently used went first


def test_info_and_clear(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    cached(tmp_path / "c").fit(paths).transform(paths)
    store = FeatureCache(tmp_path / "c")
    info = store.info()
    assert info["entries"] == len(paths) and info["feature_bytes"] == len(paths) * 256 * 4
    assert info["disk_bytes"] > 0 and info["indexed_paths"] == len(paths)
    store.clear()
    assert store.info()["entries"] == 0


def test_the_cache_survives_clone_and_pickle(image_folder, tmp_path):
    import pickle

    from sklearn.base import clone

    paths, _ = load_image_folder(image_folder)
    cached(tmp_path / "c").fit(paths).transform(paths)
    for copy in (clone(cached(tmp_path / "c")), pickle.loads(pickle.dumps(cached(tmp_path / "c")))):
        copy.fit(paths).transform(paths)
        assert copy.cache_info_.misses == 0


# -- real separate processes ----------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from torch import nn
    from skltransfer import PretrainedFeatures

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 16, 3, stride=4)
        def forward(self, x):
            time.sleep(float(sys.argv[3]))
            return self.conv(x)

    cache_dir, paths_file = sys.argv[1], sys.argv[2]
    paths = json.load(open(paths_file))
    f = PretrainedFeatures(Slow(), cache=cache_dir, batch_size=4).fit(paths)
    out = f.transform(paths)
    print(json.dumps({"hits": f.cache_info_.hits, "misses": f.cache_info_.misses,
                      "sum": float(out.astype("float64").sum())}))
    """
)


@pytest.fixture
def many_images(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    paths = []
    for i in range(40):
        p = folder / f"{i}.png"
        p.write_bytes(encode(make_image(seed=i, size=(24, 24)), "PNG"))
        paths.append(str(p))
    paths_file = tmp_path / "paths.json"
    paths_file.write_text(json.dumps(paths))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return script, paths_file, paths


def _worker(script, cache_dir, paths_file, delay):
    return [sys.executable, str(script), str(cache_dir), str(paths_file), str(delay)]


def test_sigkill_mid_run_leaves_a_valid_cache_missing_at_most_the_batch_in_flight(many_images, tmp_path):
    script, paths_file, paths = many_images
    cache_dir = tmp_path / "c"
    child = subprocess.Popen(_worker(script, cache_dir, paths_file, 0.25), stdout=subprocess.PIPE)
    store = FeatureCache(cache_dir)
    deadline = time.time() + 120
    entries = 0
    while time.time() < deadline:
        if store.path.exists():
            entries = store.info()["entries"]
            if entries >= 12:
                break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert 12 <= entries < len(paths), "killed mid-run"
    stored = store.info()["entries"]
    assert stored >= entries  # nothing committed was lost
    rerun = json.loads(subprocess.run(_worker(script, cache_dir, paths_file, 0), capture_output=True,
                                      text=True, check=True).stdout)
    assert rerun["hits"] == stored and rerun["misses"] == len(paths) - stored
    assert rerun["misses"] <= len(paths) - entries


def test_four_processes_share_one_cache_without_errors_or_lost_entries(many_images, tmp_path):
    script, paths_file, paths = many_images
    cache_dir = tmp_path / "c"
    children = [subprocess.Popen(_worker(script, cache_dir, paths_file, 0.02), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        results.append(json.loads(out))
    assert len({r["sum"] for r in results}) == 1  # every process got the same features
    assert sum(r["misses"] for r in results) == len(paths)  # and each image was computed once
    assert FeatureCache(cache_dir).info()["entries"] == len(paths)
    final = json.loads(subprocess.run(_worker(script, cache_dir, paths_file, 0), capture_output=True,
                                      text=True, check=True).stdout)
    assert final == {"hits": len(paths), "misses": 0, "sum": results[0]["sum"]}


def test_identical_images_in_one_call_are_computed_once(image_folder, tmp_path, monkeypatch):
    from skltransfer import features as features_module

    paths, _ = load_image_folder(image_folder)
    copy = tmp_path / "copy-of-first.jpg"
    shutil.copy(paths[0], copy)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    broken_twin = tmp_path / "broken-twin.jpg"
    broken_twin.write_bytes(b"not an image")
    computed = []
    original = features_module.extract_features
    monkeypatch.setattr(features_module, "extract_features",
                        lambda model, prep, items, **kw: (computed.extend(items), original(model, prep, items, **kw))[1])
    f = cached(tmp_path / "c").fit(paths)
    items = [paths[0], paths[1], str(copy), str(broken), str(broken_twin)]
    with pytest.raises(ImageLoadError) as raised:
        f.transform(items)
    assert computed == [paths[0], paths[1], str(broken)]  # each content once
    assert [failure.index for failure in raised.value.failures] == [3, 4]  # both broken files are named
    assert "broken-twin.jpg" in str(raised.value)
    np.testing.assert_array_equal(raised.value.rows[2], raised.value.rows[0])
    np.testing.assert_array_equal(raised.value.rows[:3], cached(None).fit(paths).transform(items[:3]))
