"""The feature cache's shared tier: object storage through fsspec, against memory:// and a real S3 endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline

from _s3 import BUCKET, CREDENTIALS, Gate, S3Server
from _support import TINY
from skltransfer import FeatureCache, FineTuneClassifier, ImageLoadError, PretrainedFeatures, load_image_folder, save
from skltransfer import cache as cache_module
from skltransfer import objectstore
from skltransfer.cache import SharedCacheWarning
from skltransfer.objectstore import ObjectStore

pytest.importorskip("fsspec")


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    """Each test starts as a new process would: no known objects, no outage, no warning given."""
    monkeypatch.setattr(objectstore, "_INDEXES", {})
    monkeypatch.setattr(cache_module, "_STORES", {})
    monkeypatch.setattr(cache_module, "_OUTAGES", {})
    monkeypatch.setattr(cache_module, "_WARNED", set())
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def url(request):
    """A memory:// store of this test's own, emptied afterwards."""
    location = f"memory://skltransfer-{request.node.name}-{os.getpid()}"
    yield location
    ObjectStore(location).clear()


def machine(url, tmp_path, name, **options) -> FeatureCache:
    """One machine of a cluster: the shared store behind a local folder of its own."""
    return FeatureCache(url, local=tmp_path / name, **options)


def features(cache) -> PretrainedFeatures:
    return PretrainedFeatures(TINY, weights=None, cache=cache)


def shared_rows(url, **options) -> int:
    return ObjectStore(url, options or None).info()["rows"]


def test_a_fresh_machine_reads_what_another_computed(image_folder, tmp_path, url):
    paths, _ = load_image_folder(image_folder)
    reference = features(None).fit(paths).transform(paths)
    one = features(machine(url, tmp_path, "one")).fit(paths)
    np.testing.assert_array_equal(one.transform(paths), reference)
    assert one.cache_info_.misses == len(paths)
    assert shared_rows(url) == len(paths)
    other = features(machine(url, tmp_path, "other")).fit(paths)
    np.testing.assert_array_equal(other.transform(paths), reference)
    assert (other.cache_info_.hits, other.cache_info_.misses) == (len(paths), 0)
    assert shared_rows(url) == len(paths)  # nothing computed twice, nothing written twice


def test_a_warm_machine_does_not_go_to_the_store(image_folder, tmp_path, url, monkeypatch):
    paths, _ = load_image_folder(image_folder)
    features(machine(url, tmp_path, "one")).fit(paths).transform(paths)
    other = features(machine(url, tmp_path, "other")).fit(paths)
    expected = other.transform(paths)  # read through: now kept in other's local folder
    assert machine(url, tmp_path, "other").info()["entries"] == len(paths)

    def no_network(*args, **kwargs):
        raise AssertionError("the store was asked")

    monkeypatch.setattr(ObjectStore, "get", no_network)
    monkeypatch.setattr(ObjectStore, "put", no_network)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(other.transform(paths), expected)
    assert other.cache_info_.hits == len(paths)


def test_reads_and_writes_are_batched(image_folder, tmp_path, url, monkeypatch):
    paths, _ = load_image_folder(image_folder)
    monkeypatch.setattr(cache_module, "_OBJECT_ROWS", 5)
    features(machine(url, tmp_path, "one")).fit(paths).transform(paths)
    assert ObjectStore(url).info()["objects"] == 4  # 16 rows: three objects of 5 and one of 1, not 16 objects
    calls = []
    filesystem = type(ObjectStore(url)._filesystem())  # fsspec makes an instance per thread: count on the class
    for name in ("ls", "cat_ranges", "cat", "open", "find", "info"):  # cat_ranges: one batched call on S3
        original = getattr(filesystem, name)
        monkeypatch.setattr(filesystem, name, lambda *a, _name=name, _original=original, **k: (
            calls.append(_name), _original(*a, **k))[1])
    objectstore._INDEXES.clear()
    found = features(machine(url, tmp_path, "other")).fit(paths)
    found.transform(paths)
    assert found.cache_info_.hits == len(paths)
    assert calls == ["ls", "cat_ranges", "cat_ranges"]  # the listing, the 4 headers, the rows: 3 requests' worth


def test_a_partly_written_or_damaged_object_is_never_read_as_features(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    url = (tmp_path / "store").as_uri()  # file://: a shared disk, where writes are not atomic
    reference = features(None).fit(paths).transform(paths)
    features(machine(url, tmp_path, "one")).fit(paths).transform(paths[:8])
    (obj,) = (tmp_path / "store").rglob("*.rows")
    data = obj.read_bytes()
    obj.unlink()
    (obj.parent / obj.name).write_bytes(data[: len(data) // 2])  # cut half-way, as a writer killed mid-write
    other = features(machine(url, tmp_path, "other")).fit(paths)
    np.testing.assert_array_equal(other.transform(paths[:8]), reference[:8])
    assert other.cache_info_.misses == 8
    damaged = bytearray(data)
    damaged[-3] ^= 0xFF  # one float of the last row
    obj.write_bytes(bytes(damaged))
    objectstore._INDEXES.clear()
    third = features(machine(url, tmp_path, "third")).fit(paths)
    np.testing.assert_array_equal(third.transform(paths[:8]), reference[:8])
    assert (third.cache_info_.hits, third.cache_info_.misses) >= (7, 1)


def test_writers_without_a_lock_write_duplicates_harmlessly(tmp_path, url):
    keys = [bytes([i]) * 16 for i in range(6)]
    rows = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    one, two = machine(url, tmp_path, "one"), machine(url, tmp_path, "two")
    one.put("cfg", keys[:4], rows[:4])
    two.put("cfg", keys[2:], rows[2:])  # overlaps: rows 2 and 3 written by both
    one.flush("cfg"), two.flush("cfg")
    objectstore._INDEXES.clear()
    got = machine(url, tmp_path, "three").get("cfg", keys, 4)
    np.testing.assert_array_equal(np.stack([got[k] for k in keys]), rows)


def test_a_failing_store_warns_once_loses_nothing_and_the_next_run_fills_it(image_folder, tmp_path, url,
                                                                             monkeypatch):
    paths, _ = load_image_folder(image_folder)
    reference = features(None).fit(paths).transform(paths)
    secret = CREDENTIALS["AWS_SECRET_ACCESS_KEY"]

    def down(*args, **kwargs):
        raise ConnectionError(f"could not connect to http://user:{secret}@127.0.0.1:9/ (refused)")

    real_get, real_put = ObjectStore.get, ObjectStore.put
    monkeypatch.setattr(ObjectStore, "get", down)
    monkeypatch.setattr(ObjectStore, "put", down)
    f = features(machine(url, tmp_path, "one")).fit(paths)
    with pytest.warns(SharedCacheWarning) as caught:
        first = f.transform(paths[:8])
        second = f.transform(paths)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert secret not in message and "one" in message and "later run" in message
    np.testing.assert_array_equal(np.vstack([first, second[8:]]), reference)
    assert machine(url, tmp_path, "one").info()["unshared"] == len(paths)

    monkeypatch.setattr(ObjectStore, "get", real_get)
    monkeypatch.setattr(ObjectStore, "put", real_put)
    monkeypatch.setattr(cache_module, "_OUTAGES", {})  # the store answers again, and its pause is over
    f.transform(paths)  # every row local: no compute, and the rows the store lacks go up
    assert f.cache_info_.hits == len(paths)
    assert shared_rows(url) == len(paths)
    assert machine(url, tmp_path, "one").info()["unshared"] == 0
    fresh = features(machine(url, tmp_path, "fresh")).fit(paths)
    np.testing.assert_array_equal(fresh.transform(paths), reference)
    assert fresh.cache_info_.hits == len(paths)


def test_a_bad_image_is_named_and_the_good_rows_still_reach_the_store(image_folder, tmp_path, url):
    paths, _ = load_image_folder(image_folder)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    f = features(machine(url, tmp_path, "one")).fit(paths)
    with pytest.raises(ImageLoadError, match="broken.jpg") as raised:
        f.transform([*paths, str(broken)])
    assert [failure.index for failure in raised.value.failures] == [len(paths)]
    assert shared_rows(url) == len(paths)  # uploaded before the error left the call
    fresh = features(machine(url, tmp_path, "fresh")).fit(paths)
    np.testing.assert_array_equal(fresh.transform(paths), raised.value.rows[: len(paths)])
    assert fresh.cache_info_.hits == len(paths)


def test_a_failed_store_is_left_alone_for_a_while(tmp_path, url, monkeypatch):
    asked = []

    def down(self, *args, **kwargs):
        asked.append(1)
        raise OSError("refused")

    monkeypatch.setattr(ObjectStore, "get", down)
    cache = machine(url, tmp_path, "one")
    with pytest.warns(SharedCacheWarning):
        for _ in range(5):
            assert cache.get("cfg", [b"k" * 16], 3) == {}
    assert len(asked) == 1
    (until, failures), = [v for k, v in cache_module._OUTAGES.items() if k[1] == "read"]
    assert failures == 1 and 50 < until - time.monotonic() <= 60


def test_credentials_are_refused_and_never_written(image_folder, tmp_path, url):
    with pytest.raises(ValueError, match="'key' holds a credential") as raised:
        FeatureCache("s3://bucket/features", storage_options={"key": "AKIAX", "secret": "hunter2hunter2"})
    assert "hunter2" not in str(raised.value)
    with pytest.raises(ValueError, match=r"'client_kwargs.aws_secret_access_key'"):
        FeatureCache("s3://bucket/f", storage_options={"client_kwargs": {"aws_secret_access_key": "hunter2"}})
    with pytest.raises(ValueError, match="holds credentials") as raised:
        FeatureCache("s3://AKIAX:hunter2hunter2@bucket/features")
    assert "hunter2" not in str(raised.value)
    paths, labels = load_image_folder(image_folder)
    model = Pipeline([("f", features(machine(url, tmp_path, "one"))), ("c", LogisticRegression())])
    model.fit(paths, labels)
    save(model, tmp_path / "model.skops")
    with zipfile.ZipFile(tmp_path / "model.skops") as archive:
        text = b"".join(archive.read(name) for name in archive.namelist())
    assert url.encode() in text  # the store is part of the model...
    for value in CREDENTIALS.values():
        assert value.encode() not in text  # ...its credentials are not


def test_the_environment_variable_shares_the_default_cache(image_folder, tmp_path, url, monkeypatch):
    paths, _ = load_image_folder(image_folder)
    monkeypatch.setenv("SKLTRANSFER_CACHE_URL", url)
    f = features("auto").fit(paths)
    f.transform(paths)
    assert shared_rows(url) == len(paths)
    monkeypatch.setenv("SKLTRANSFER_CACHE_DIR", str(tmp_path / "another-machine"))
    f.transform(paths)
    assert f.cache_info_.hits == len(paths)
    assert "shared" in FeatureCache().info()


def test_a_url_in_cache_pickles_and_compares_by_its_parameters(tmp_path, url):
    import pickle

    cache = FeatureCache(url, local=tmp_path / "l", storage_options={"endpoint_url": "http://127.0.0.1:1"})
    again = pickle.loads(pickle.dumps(cache))
    assert again == cache and again.shared_url == url and again.path == cache.path
    old = FeatureCache.__new__(FeatureCache)
    old.__setstate__({"directory": str(tmp_path / "d"), "max_bytes": None})  # pickled before the shared tier
    assert old.path == (tmp_path / "d" / "features.sqlite3").resolve() and old.shared_url is None
    with pytest.raises(ValueError, match="local= goes with a URL"):
        FeatureCache(tmp_path / "a", local=tmp_path / "b")


def test_finetune_keeps_its_probe_features_where_the_user_said(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    clf = FineTuneClassifier(TINY, weights=None, epochs=1, batch_size=8, early_stopping=False, engine="torch",
                             cache=tmp_path / "mine", random_state=0).fit(paths, labels)
    clf.set_params(engine="openvino").predict(paths[:2])  # converts the fine-tuned model, keeps the conversion
    mine, default = FeatureCache(tmp_path / "mine").info(), FeatureCache().info()
    assert (mine["entries"], mine["engine_models"]) == (len(paths), 1)
    assert (default["entries"], default["engine_models"]) == (0, 0)  # the default folder received nothing


def test_cli_cache_info_shows_both_tiers(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    url = (tmp_path / "store").as_uri()
    features(machine(url, tmp_path, "one")).fit(paths).transform(paths)
    env = os.environ | {"SKLTRANSFER_CACHE_DIR": str(tmp_path / "one")}
    run = subprocess.run([sys.executable, "-m", "skltransfer", "cache", "info", "--cache", url],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"shared store:   {url}" in run.stdout
    assert f"rows:         {len(paths)} in 1 objects" in run.stdout
    assert "to upload:    0 local rows" in run.stdout
    run = subprocess.run([sys.executable, "-m", "skltransfer", "cache", "clear", "--cache", url, "--shared"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert ObjectStore(url).info()["rows"] == 0


# -- a real S3 endpoint (moto's server, on 127.0.0.1) ------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    with S3Server() as server:
        yield server


@pytest.fixture
def gate(s3):
    relay = Gate(s3.port)
    yield relay
    relay.stop()


def s3_machine(gate, tmp_path, name, prefix, **options):
    return FeatureCache(f"s3://{BUCKET}/{prefix}", local=tmp_path / name,
                        storage_options={"endpoint_url": gate.endpoint}, **options)


def test_s3_a_cluster_shares_features_and_survives_the_store_going_away(image_folder, tmp_path, gate, request):
    paths, _ = load_image_folder(image_folder)
    reference = features(None).fit(paths).transform(paths)
    prefix = request.node.name
    one = features(s3_machine(gate, tmp_path, "one", prefix)).fit(paths)
    np.testing.assert_array_equal(one.transform(paths[:8]), reference[:8])

    gate.close()  # the store is down
    two = features(s3_machine(gate, tmp_path, "two", prefix, timeout=5)).fit(paths)
    with pytest.warns(SharedCacheWarning) as caught:
        np.testing.assert_array_equal(two.transform(paths), reference)
        two.transform(paths)
    assert len(caught) == 1
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in str(caught[0].message)
    assert two.cache_info_.hits == len(paths)  # kept locally: nothing lost

    gate.open()
    cache_module._OUTAGES.clear()
    two.transform(paths)  # the next run fills the store (two computed all 16 while it was away)
    assert ObjectStore(f"s3://{BUCKET}/{prefix}", {"endpoint_url": gate.endpoint}).info()["rows"] == 8 + len(paths)
    three = features(s3_machine(gate, tmp_path, "three", prefix)).fit(paths)
    np.testing.assert_array_equal(three.transform(paths), reference)
    assert three.cache_info_.hits == len(paths)


def test_s3_a_slow_store_costs_one_timeout(image_folder, tmp_path, gate, request):
    paths, _ = load_image_folder(image_folder)
    gate.stall()  # connections accepted, never answered
    f = features(s3_machine(gate, tmp_path, "one", request.node.name, timeout=1)).fit(paths)
    start = time.monotonic()
    with pytest.warns(SharedCacheWarning, match="within 1 s"):
        f.transform(paths)
        f.transform(paths)
    assert time.monotonic() - start < 20
    assert f.cache_info_.hits == len(paths)


def test_s3_grid_search_on_dask_computes_each_image_once(image_folder, tmp_path, gate, request):
    distributed = pytest.importorskip("distributed")
    import joblib

    paths, labels = load_image_folder(image_folder)
    prefix = request.node.name
    cache = FeatureCache(f"s3://{BUCKET}/{prefix}", storage_options={"endpoint_url": gate.endpoint})
    grid = GridSearchCV(Pipeline([("f", features(cache)), ("c", LogisticRegression())]),
                        {"c__C": [0.1, 1.0, 10.0]}, cv=KFold(4, shuffle=True, random_state=0))
    serial = GridSearchCV(Pipeline([("f", features(None)), ("c", LogisticRegression())]),
                          {"c__C": [0.1, 1.0, 10.0]}, cv=KFold(4, shuffle=True, random_state=0)).fit(paths, labels)
    cloudpickle = pytest.importorskip("cloudpickle")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        with distributed.Client(cl) as client:
            for i, worker in enumerate(client.scheduler_info()["workers"]):  # a local folder each: two machines
                client.run(_set_environment, "SKLTRANSFER_CACHE_DIR", str(tmp_path / f"worker{i}"),
                           workers=[worker])
            client.run(_slow_down_extraction, 0.5)  # so that the workers' first fits overlap, as with real images
            with joblib.parallel_backend("dask"):
                grid.fit(paths, labels)
    assert grid.best_score_ == pytest.approx(serial.best_score_)
    assert ObjectStore(cache.shared_url, cache.storage_options).info()["rows"] == len(paths)
    for i in range(2):  # each worker computed or read its rows into its own folder
        assert FeatureCache(tmp_path / f"worker{i}").info()["entries"] > 0


def _slow_down_extraction(seconds: float) -> None:
    """On a worker: every extraction takes ``seconds`` longer (the rows are unchanged)."""
    from skltransfer import features as module

    original = module.extract_features

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    module.extract_features = slow



def _set_environment(name: str, value: str) -> None:
    os.environ[name] = value
