"""The feature cache: no image goes through the same backbone twice.

One job: map ``(image content, feature configuration)`` to a stored feature
row, on disk, shared by every process that points at the same folder.

* **Content**: sha256 of a file's bytes (or of an array's bytes, shape and
  dtype), so a renamed or moved file hits and a file changed in place misses.
  A ``(path, size, mtime)`` index in front means an unchanged file is not
  read again to find its entry.
* **Configuration**: a digest of everything that changes the numbers:
  backbone name, weight fingerprint, resolved preprocessing, pooling,
  precision (:func:`feature_config_id`).
* **Storage**: one SQLite database in WAL mode. Every batch is committed as
  one transaction, so a process killed mid-run leaves a valid cache that
  holds every finished batch; several processes share it through SQLite's
  locking; while one process computes the misses of a configuration,
  others wanting the same configuration wait and then read its results, so
  parallel ``GridSearchCV`` workers never compute an image twice. Each row carries a CRC32 of its vector: a damaged row is a miss,
  a damaged database file is moved aside and rebuilt, and neither is ever
  returned as features.
* **Eviction**: optional ``max_bytes``, least recently used rows first
  (recency is recorded while a limit is set; without one, reads never write).
* **A shared tier** (optional): an fsspec URL (``s3://bucket/prefix`` ...)
  that many machines share, behind the local database
  (:mod:`skltransfer.objectstore`). Reads go local first, then to the store,
  and what the store returns is kept locally (read-through), so a warm
  machine does not touch the network. Computed rows are committed locally
  together with an "unshared" mark and uploaded in batches (write-through);
  a mark is removed only once its row is in the store. A store that fails
  (unreachable, slow, refusing writes) is skipped for a while after one
  warning per process: features are computed and kept locally, and the
  marked rows are uploaded by a later run once it answers. On a Dask worker
  one worker of the cluster computes a configuration at a time (a
  ``distributed.Lock``), so a cluster computes each image once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .objectstore import ObjectStore, check_no_credentials, is_url, public_url, redact

__all__ = [
    "CacheInfo", "FeatureCache", "SharedCacheWarning", "as_feature_cache", "cached_features", "content_keys", "default_cache_dir",
    "feature_config_id", "user_cache_home",
]

CACHE_DIR_ENV = "SKLTRANSFER_CACHE_DIR"
#: An fsspec URL every process shares (``s3://bucket/prefix``): the shared tier of ``cache="auto"``.
CACHE_URL_ENV = "SKLTRANSFER_CACHE_URL"
#: Rows per shared object: uploads wait for this many new rows (or the end of a call).
_OBJECT_ROWS = 1024
#: Seconds a failed shared store is left alone before it is tried again (doubling each time, to 15 minutes).
_RETRY_AFTER = 60.0
_RETRY_AT_MOST = 900.0
_DB_NAME = "features.sqlite3"
_CHUNK = 500  # SQL variables per IN (...) query
_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    config TEXT NOT NULL,
    key BLOB NOT NULL,
    vec BLOB NOT NULL,
    crc INTEGER NOT NULL,
    last_used REAL NOT NULL,
    PRIMARY KEY (config, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS features_last_used ON features (last_used);
CREATE TABLE IF NOT EXISTS paths (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    key BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unshared (
    config TEXT NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (config, key)
) WITHOUT ROWID;
"""


def user_cache_home() -> Path:
    """The library's folder in the user's cache: ``$XDG_CACHE_HOME/skltransfer``, else ``~/.cache/skltransfer``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "skltransfer"


def default_cache_dir() -> Path:
    """``$SKLTRANSFER_CACHE_DIR``, else :func:`user_cache_home` (``~/.cache/skltransfer``)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return user_cache_home()


def as_feature_cache(cache: str | os.PathLike | FeatureCache | None) -> FeatureCache | None:
    """The store an estimator's ``cache=`` names: ``"auto"``, a folder, an fsspec URL, a FeatureCache or None.

    >>> as_feature_cache("s3://bucket/features").shared_url, as_feature_cache(None)
    ('s3://bucket/features', None)
    """
    if cache is None or isinstance(cache, FeatureCache):
        return cache
    return FeatureCache(None if isinstance(cache, str) and cache == "auto" else cache)


def feature_config_id(description: dict[str, Any]) -> str:
    """A stable digest of everything that determines the feature values.

    Examples
    --------
    >>> feature_config_id({"backbone": "a", "pooling": "avg"}) == feature_config_id(
    ...     {"pooling": "avg", "backbone": "a"})
    True
    """
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class CacheInfo:
    """What the last ``transform`` did: cache hits, misses and seconds spent."""

    hits: int = 0
    misses: int = 0
    seconds: float = 0.0


class SharedCacheWarning(UserWarning):
    """The shared tier of a feature cache failed; the features are computed and kept locally instead."""


class FeatureCache:
    """A feature store on disk, safe to share between processes, with an optional shared tier.

    Parameters
    ----------
    location : str or PathLike, optional
        A folder: the local database lives there (created if missing). An
        fsspec URL (``s3://bucket/prefix``, ``gs://``, ``az://``,
        ``file:///mnt/shared/features``, ``memory://``): a store shared by
        every machine that can reach it, in front of which a local database
        (``local``) keeps what this machine has seen. Default: the folder
        :func:`~skltransfer.cache.default_cache_dir`, shared through
        ``$SKLTRANSFER_CACHE_URL`` if that is set where the code runs.
    max_bytes : int, optional
        Size limit for the local database's features; least recently used
        rows are evicted past it. ``None``: no limit. The shared store is
        never evicted from.
    local : str or PathLike, optional
        With a URL: the local folder in front of it. Default:
        :func:`~skltransfer.cache.default_cache_dir`.
    storage_options : dict, optional
        With a URL: options for the fsspec filesystem (``endpoint_url``,
        ``anon``, ``client_kwargs`` ...). Credentials are refused: the
        backend reads them from the environment, its config files or an
        instance role, so they never travel with a model file or a pickle.
    timeout : float, default=20
        Seconds one call to the shared store may take before the store
        counts as down. A store that failed is left alone for a minute,
        then twice as long after each further failure (at most 15 minutes).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> cache = FeatureCache(tempfile.mkdtemp())
    >>> cache.put("cfg", [b"k1"], np.ones((1, 3), np.float32))
    >>> cache.get("cfg", [b"k1", b"k2"], 3)[b"k1"]
    array([1., 1., 1.], dtype=float32)
    >>> cache.info()["entries"]
    1

    A shared tier (``memory://`` here; ``s3://bucket/prefix`` on a cluster):
    a second machine, with an empty local folder, reads the first one's rows.

    >>> one = FeatureCache("memory://team-features", local=tempfile.mkdtemp())
    >>> one.put("cfg", [b"k" * 16], np.ones((1, 3), np.float32))
    >>> one.flush("cfg")  # rows uploaded (put gathers them; cached_features flushes)
    1
    >>> other = FeatureCache("memory://team-features", local=tempfile.mkdtemp())
    >>> other.get("cfg", [b"k" * 16], 3)[b"k" * 16]
    array([1., 1., 1.], dtype=float32)
    >>> other.clear(shared=True)
    """

    def __init__(self, location: str | os.PathLike | None = None, max_bytes: int | None = None, *,
                 local: str | os.PathLike | None = None, storage_options: dict | None = None,
                 timeout: float = 20.0):
        self.location = location
        self.max_bytes = max_bytes
        self.local = local
        self.storage_options = storage_options
        self.timeout = timeout
        if local is not None and location is not None and not is_url(location):
            raise ValueError(f"local= goes with a URL location; {location!r} is a folder already")
        if is_url(location):
            check_no_credentials(location, storage_options)
        elif storage_options:
            raise ValueError("storage_options= goes with a URL location (s3://bucket/prefix, ...)")

    # Parameters only: the connection is per process and never pickled.
    def __getstate__(self):
        return {"location": self.location, "max_bytes": self.max_bytes, "local": self.local,
                "storage_options": self.storage_options, "timeout": self.timeout}

    def __setstate__(self, state):
        state = dict(state)
        if "directory" in state:  # written before the shared tier existed
            state["location"] = state.pop("directory")
        self.__dict__.update({"local": None, "storage_options": None, "timeout": 20.0} | state)

    def __repr__(self) -> str:
        shared = self.shared_url
        where = f"{str(self.path.parent)!r}" if shared is None else f"{public_url(shared)!r}, local={str(self.path.parent)!r}"
        return f"FeatureCache({where}, max_bytes={self.max_bytes!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, FeatureCache) and self.__getstate__() == other.__getstate__()

    def __hash__(self) -> int:
        return hash((str(self.location), self.max_bytes, str(self.local)))

    @property
    def path(self) -> Path:
        """The local database file."""
        folder = self.local if is_url(self.location) else self.location
        directory = Path(folder) if folder is not None else default_cache_dir()
        return directory.expanduser().resolve() / _DB_NAME

    @property
    def shared_url(self) -> str | None:
        """The shared store's URL: ``location`` if it is one, else ``$SKLTRANSFER_CACHE_URL`` for the default."""
        if is_url(self.location):
            return os.fspath(self.location)
        if self.location is None and os.environ.get(CACHE_URL_ENV):
            return os.environ[CACHE_URL_ENV]
        return None

    @property
    def engine_directory(self) -> Path:
        """Where converted inference-engine models live, next to the database."""
        return self.path.parent / "engines"

    def _shared(self, operation: str) -> ObjectStore | None:
        """The shared store, unless there is none or it failed ``operation`` ("read" / "write") lately."""
        url = self.shared_url
        if url is None or time.monotonic() < _OUTAGES.get((url, operation), (0.0, 0))[0]:
            return None
        key = (url, json.dumps(self.storage_options, sort_keys=True, default=str), self.timeout)
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = ObjectStore(url, self.storage_options, self.timeout)
        return store

    def _shared_failed(self, operation: str, exc: BaseException) -> None:
        """One warning per process and store; the store is left alone for a while."""
        url = self.shared_url
        operations = ("read", "write") if not isinstance(exc, PermissionError) else (operation,)
        for op in operations:
            failures = _OUTAGES.get((url, op), (0.0, 0))[1] + 1
            _OUTAGES[(url, op)] = (time.monotonic() + min(_RETRY_AFTER * 2 ** (failures - 1), _RETRY_AT_MOST),
                                   failures)
        if url in _WARNED:
            return
        _WARNED.add(url)
        reason = redact(f"{type(exc).__name__}: {exc}")[:500]
        warnings.warn(
            f"the shared feature cache {public_url(url)} cannot be {_PARTICIPLE[operation]} ({reason}). Features are "
            f"computed here and kept in the local cache {self.path.parent}; rows the store lacks are uploaded "
            f"by a later run once it answers.",
            SharedCacheWarning, stacklevel=4,
        )

    # -- connection handling ------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        key = (os.getpid(), threading.get_ident(), str(self.path))
        conn = _CONNECTIONS.get(key)
        if conn is None:
            conn = self._open()
            _CONNECTIONS[key] = conn
        return conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return _open_db(self.path)
        except sqlite3.DatabaseError:
            _quarantine(self.path)
            return _open_db(self.path)

    def _run(self, operation):
        """Run ``operation(conn)``; a damaged database is moved aside and rebuilt once."""
        try:
            return operation(self._connect())
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            self._drop_connection()
            _quarantine(self.path)
            return operation(self._connect())

    def _drop_connection(self) -> None:
        key = (os.getpid(), threading.get_ident(), str(self.path))
        conn = _CONNECTIONS.pop(key, None)
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # -- features -----------------------------------------------------------

    def get(self, config: str, keys: Sequence[bytes], width: int) -> dict[bytes, np.ndarray]:
        """Stored rows for the keys that have one (damaged rows count as absent).

        Local rows first; with a shared tier, the rest from the store, kept
        locally as they arrive (a store that fails gives a warning and no rows).
        """
        found = self._get_local(config, keys, width)
        if self.shared_url is None:
            return found
        missing = [k for k in dict.fromkeys(keys) if k is not None and k not in found]
        store = self._shared("read") if missing else None
        if store is None:
            return found
        try:
            fetched = store.get(config, missing, width)
        except Exception as exc:  # any backend failure: warn once, compute instead
            self._shared_failed("read", exc)
            return found
        _OUTAGES.pop((self.shared_url, "read"), None)
        if fetched:
            fetched_keys = list(fetched)
            self._put_local(config, fetched_keys, np.stack([fetched[k] for k in fetched_keys]), unshared=False)
        return found | fetched

    def _get_local(self, config: str, keys: Sequence[bytes], width: int) -> dict[bytes, np.ndarray]:
        wanted = list(dict.fromkeys(k for k in keys if k is not None))

        def read(conn):
            found_keys: list[bytes] = []
            blobs: list[bytes] = []
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT key, vec, crc FROM features WHERE config = ? AND key IN ({marks})",
                    (config, *chunk),
                ).fetchall()
                for key, vec, crc in rows:
                    if len(vec) == 4 * width and zlib.crc32(vec) == crc:
                        found_keys.append(bytes(key))
                        blobs.append(vec)
            if found_keys and self.max_bytes is not None:
                self._touch(conn, config, found_keys)
            return found_keys, blobs

        found_keys, blobs = self._run(read)
        if not found_keys:
            return {}
        matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), width)
        return dict(zip(found_keys, matrix))

    def put(self, config: str, keys: Sequence[bytes], features: np.ndarray) -> None:
        """Store rows (one local transaction: all of them or none).

        With a shared tier they are marked unshared in the same transaction
        and uploaded once enough have gathered (or at :meth:`flush`).
        """
        shared = self.shared_url is not None
        self._put_local(config, keys, features, unshared=shared)
        if shared and self._unshared_count(config) >= _OBJECT_ROWS:
            self.flush(config, whole_objects=True)

    def _put_local(self, config: str, keys: Sequence[bytes], features: np.ndarray, *, unshared: bool) -> None:
        now = time.time()
        rows = []
        for key, row in zip(keys, np.asarray(features, dtype=np.float32)):
            if key is None:
                continue
            blob = np.ascontiguousarray(row).tobytes()
            rows.append((config, key, blob, zlib.crc32(blob), now))

        def write(conn):
            with conn:
                conn.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?, ?)", rows)
                if unshared:
                    conn.executemany("INSERT OR IGNORE INTO unshared VALUES (?, ?)", [r[:2] for r in rows])
            if self.max_bytes is not None:
                self._evict(conn)

        if rows:
            self._run(write)

    def _unshared_count(self, config: str) -> int:
        return self._run(lambda conn: conn.execute(
            "SELECT COUNT(*) FROM unshared WHERE config = ?", (config,)).fetchone()[0])

    def flush(self, config: str, *, whole_objects: bool = False) -> int:
        """Upload the configuration's rows the shared store lacks; returns how many went.

        One object per 1,024 rows (``_OBJECT_ROWS``). A row's unshared mark goes
        only once the store has it; a failing store gives one warning and the
        marks stay for a later run. Without a shared tier: nothing to do.
        """
        store = self._shared("write") if self.shared_url is not None else None
        if store is None:
            return 0
        sent = 0
        while True:
            def pending(conn):
                return conn.execute(
                    "SELECT u.key, f.vec, f.crc FROM unshared u LEFT JOIN features f "
                    "ON f.config = u.config AND f.key = u.key WHERE u.config = ? LIMIT ?",
                    (config, _OBJECT_ROWS)).fetchall()

            rows = self._run(pending)
            if not rows or (whole_objects and len(rows) < _OBJECT_ROWS):
                return sent
            good = [(bytes(k), v) for k, v, crc in rows if v is not None and zlib.crc32(v) == crc]
            if good:
                width = len(good[0][1]) // 4
                good = [(k, v) for k, v in good if len(v) == 4 * width]
                matrix = np.frombuffer(b"".join(v for _, v in good), dtype=np.float32).reshape(len(good), width)
                try:
                    store.put(config, [k for k, _ in good], matrix)
                except Exception as exc:
                    self._shared_failed("write", exc)
                    return sent
                _OUTAGES.pop((self.shared_url, "write"), None)
                sent += len(good)
            done = [(config, k) for k, _, _ in rows]  # sent, or evicted or damaged: nothing left to send

            def unmark(conn):
                with conn:
                    conn.executemany("DELETE FROM unshared WHERE config = ? AND key = ?", done)

            self._run(unmark)

    def _touch(self, conn, config: str, keys: list[bytes]) -> None:
        """Record use (for least-recently-used eviction; only while a size limit is set)."""
        now = time.time()
        try:
            with conn:
                for chunk in _chunks(keys):
                    marks = ",".join("?" * len(chunk))
                    conn.execute(
                        f"UPDATE features SET last_used = ? WHERE config = ? AND key IN ({marks})",
                        (now, config, *chunk),
                    )
        except sqlite3.OperationalError:
            pass  # recency is a hint; never fail a read over it

    def _evict(self, conn) -> None:
        (total,) = conn.execute("SELECT COALESCE(SUM(LENGTH(vec)), 0) FROM features").fetchone()
        if total <= self.max_bytes:
            return
        target = int(self.max_bytes * 0.9)
        with conn:
            rows = conn.execute("SELECT config, key, LENGTH(vec) FROM features ORDER BY last_used").fetchall()
            doomed = []
            for config, key, size in rows:
                if total <= target:
                    break
                doomed.append((config, key))
                total -= size
            conn.executemany("DELETE FROM features WHERE config = ? AND key = ?", doomed)

    @contextmanager
    def computing(self, config: str) -> Iterator[None]:
        """Hold the configuration's compute lock (one process computes at a time).

        An OS file lock: released by the kernel if its holder dies, so a
        killed process never blocks the others. With a shared tier, on a
        Dask worker, also the cluster's lock of the configuration (a
        ``distributed.Lock``, released by the scheduler if its holder's
        worker dies), so that one worker of the cluster computes it at a time.
        """
        with _cluster_lock(self.shared_url, config), file_lock(self.path.parent / "locks" / f"{config}.lock"):
            yield

    # -- the path index -------------------------------------------------------

    def known_paths(self, stats: dict[str, tuple[int, int]]) -> dict[str, bytes]:
        """Content keys of paths whose size and mtime are unchanged since they were hashed."""
        paths = list(stats)

        def read(conn):
            known = {}
            for chunk in _chunks(paths):
                marks = ",".join("?" * len(chunk))
                for path, size, mtime_ns, key in conn.execute(
                    f"SELECT path, size, mtime_ns, key FROM paths WHERE path IN ({marks})", chunk
                ):
                    if stats[path] == (size, mtime_ns):
                        known[path] = bytes(key)
            return known

        return self._run(read)

    def remember_paths(self, entries: list[tuple[str, int, int, bytes]]) -> None:
        def write(conn):
            with conn:
                conn.executemany("INSERT OR REPLACE INTO paths VALUES (?, ?, ?, ?)", entries)

        if entries:
            self._run(write)

    # -- looking after it ------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Entries, feature bytes, configurations and the file's size on disk; engine conversions kept.

        ``"unshared"`` counts local rows waiting to be uploaded to a shared
        store. With a shared tier, ``"shared"`` describes the store (``url``,
        ``objects``, ``rows``, ``bytes``, ``configurations``; or ``error``
        when it cannot be read).
        """

        def read(conn):
            entries, stored = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(vec)), 0) FROM features"
            ).fetchone()
            (configs,) = conn.execute("SELECT COUNT(DISTINCT config) FROM features").fetchone()
            (paths,) = conn.execute("SELECT COUNT(*) FROM paths").fetchone()
            (unshared,) = conn.execute("SELECT COUNT(*) FROM unshared").fetchone()
            return entries, stored, configs, paths, unshared

        entries, stored, configs, paths, unshared = self._run(read)
        on_disk = sum(
            p.stat().st_size for p in self.path.parent.glob(_DB_NAME + "*") if p.is_file()
        )
        engines = [p for p in self.engine_directory.glob("*") if p.is_dir() and not p.name.startswith(".")]
        engine_bytes = sum(f.stat().st_size for d in engines for f in d.iterdir() if f.is_file())
        return {
            "path": str(self.path),
            "entries": entries,
            "feature_bytes": stored,
            "disk_bytes": on_disk,
            "configurations": configs,
            "indexed_paths": paths,
            "max_bytes": self.max_bytes,
            "engine_models": len(engines),
            "engine_bytes": engine_bytes,
            "unshared": unshared,
        } | ({} if self.shared_url is None else {"shared": self._shared_info()})

    def _shared_info(self) -> dict[str, Any]:
        url = self.shared_url
        try:
            return ObjectStore(url, self.storage_options, self.timeout).info()
        except Exception as exc:
            return {"url": public_url(url), "error": redact(f"{type(exc).__name__}: {exc}")[:500]}

    def clear(self, *, shared: bool = False) -> None:
        """Delete every local feature, path index entry and engine conversion.

        ``shared=True`` also deletes every object of the shared store: the
        rows of every machine that uses it.
        """

        def wipe(conn):
            with conn:
                conn.execute("DELETE FROM features")
                conn.execute("DELETE FROM paths")
                conn.execute("DELETE FROM unshared")
            conn.execute("VACUUM")

        self._run(wipe)
        shutil.rmtree(self.engine_directory, ignore_errors=True)
        if shared and self.shared_url is not None:
            ObjectStore(self.shared_url, self.storage_options, self.timeout).clear()


_PARTICIPLE = {"read": "read", "write": "written"}
#: Per process: the stores in use, when each failed store is tried again, the stores warned about.
_STORES: dict[tuple, ObjectStore] = {}
_OUTAGES: dict[tuple[str, str], tuple[float, int]] = {}  # (url, operation) -> (retry after, failures)
_WARNED: set[str] = set()


def _cluster_lock(url: str | None, config: str):
    """On a Dask worker with a shared store: the cluster-wide lock of ``config`` in that store; else nothing.

    Only looked for when ``distributed`` is already imported (a worker has it).
    """
    if url is None or "distributed" not in sys.modules:
        return nullcontext()
    from distributed import Lock, get_worker

    try:
        get_worker()
    except ValueError:
        return nullcontext()
    name = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Lock(f"skltransfer-features-{name}-{config}")


_CONNECTIONS: dict[tuple, sqlite3.Connection] = {}


def _open_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=120.0, isolation_level="DEFERRED", check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 120000")
    # Large pages: a 5 KB feature row fits in a page instead of spilling into
    # overflow pages (takes effect when the file is created).
    conn.execute("PRAGMA page_size = 65536")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 64")  # pages: keeps the WAL file near 4 MB
    conn.execute("PRAGMA synchronous = NORMAL")
    with conn:
        conn.executescript(_SCHEMA)
    conn.execute("SELECT COUNT(*) FROM paths LIMIT 1").fetchone()  # touches the file: fails if damaged
    return conn


def _quarantine(path: Path) -> None:
    """Move a damaged database aside (kept for inspection) so a fresh one starts."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            try:
                p.rename(p.with_name(f"{p.name}.corrupt-{stamp}-{os.getpid()}"))
            except OSError:
                pass


def _chunks(values: list, size: int = _CHUNK):
    for start in range(0, len(values), size):
        yield values[start : start + size]


# -- content keys ------------------------------------------------------------------


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive OS file lock on ``path`` (created with its folder); the kernel releases it if we die.

    ``filelock.FileLock``: ``flock`` on POSIX, ``msvcrt`` locking on Windows.
    """
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(os.fspath(path)):
        yield


#: ``compute(items, keep)``: the rows of ``items``, calling ``keep(positions, rows)`` after
#: every batch; raises ``ImageLoadError`` (positions in ``items``) after computing the rest.
Compute = Callable[[Sequence[Any], Callable[[list[int], np.ndarray], None]], np.ndarray]


def cached_features(
    store: FeatureCache, config: str, items: Sequence[Any], width: int, compute: Compute
) -> tuple[np.ndarray, CacheInfo]:
    """Rows for ``items`` under configuration ``config``: stored ones read, only the rest computed.

    The protocol, in one place: content keys; hits read in bulk (local, then
    the shared tier if any); the configuration's compute lock (one process,
    or on Dask one worker of the cluster, computes a configuration at a time,
    others wait and then read its rows); a second read after the wait; every
    computed batch stored locally as it arrives, so an error or a kill loses
    at most the batch in flight; the new rows uploaded to the shared tier
    before the lock is released.

    Parameters
    ----------
    store : FeatureCache
    config : str
        The configuration's id (:func:`feature_config_id`).
    items : sequence
        Image items (paths, bytes, PIL images, arrays).
    width : int
        Row width.
    compute : callable
        ``compute(missing_items, keep) -> rows``; see ``Compute``.

    Returns
    -------
    features : ndarray of shape (len(items), width), float32
    info : CacheInfo
        Hits and misses (seconds: the caller's to fill).

    Raises
    ------
    ImageLoadError
        From ``compute``, with positions in ``items``; every good row is stored
        (and, where ``compute`` attached them, returned in its ``rows``).
    """
    from .decoding import ImageFailure, ImageLoadError, describe_item

    keys = content_keys(items, store)
    features = np.empty((len(items), width), dtype=np.float32)

    def fill(found: dict, positions: list[int]) -> list[int]:
        """Copy found rows in; return the positions still missing."""
        hit = [i for i in positions if keys[i] in found]
        if hit:
            features[hit] = np.stack([found[keys[i]] for i in hit])
        return [i for i in positions if keys[i] not in found]

    missing = fill(store.get(config, keys, width), list(range(len(items))))
    if not missing:
        store.flush(config)  # rows an earlier run could not share (no request when there are none)
    else:
        with store.computing(config):
            # Another process may have computed some of them while we waited.
            missing = fill(store.get(config, [keys[i] for i in missing], width), missing)

            # Identical images (a copied file, a duplicate in a data set) are computed once.
            todo, twins = _distinct(missing, keys)

            def keep(positions: list[int], rows: np.ndarray) -> None:
                store.put(config, [keys[todo[j]] for j in positions], rows)

            try:
                if todo:
                    features[todo] = compute([items[i] for i in todo], keep)
                for i, first in twins.items():
                    features[i] = features[first]
            except ImageLoadError as exc:  # positions in the misses -> positions in items
                if exc.rows is not None:
                    features[todo] = exc.rows
                    for i, first in twins.items():
                        features[i] = features[first]
                failed = [dataclasses.replace(f, index=todo[f.index]) for f in exc.failures]
                failed_at = {f.index for f in failed}
                failed += [ImageFailure(i, describe_item(items[i]), next(f.reason for f in failed if f.index == first))
                           for i, first in twins.items() if first in failed_at]
                raise ImageLoadError(sorted(failed, key=lambda f: f.index),
                                     rows=None if exc.rows is None else features) from None
            finally:
                store.flush(config)  # before the lock goes: the processes waiting for it read these rows
    return features, CacheInfo(len(items) - len(missing), len(missing), 0.0)


def _distinct(positions: list[int], keys: list[bytes | None]) -> tuple[list[int], dict[int, int]]:
    """The positions to compute (one per content key; every unkeyed one) and each twin's first position.

    >>> _distinct([0, 1, 2, 3], [b"a", b"b", b"a", None])
    ([0, 1, 3], {2: 0})
    """
    first: dict[bytes, int] = {}
    todo, twins = [], {}
    for i in positions:
        key = keys[i]
        if key is not None and key in first:
            twins[i] = first[key]
        else:
            if key is not None:
                first[key] = i
            todo.append(i)
    return todo, twins


def content_keys(items: Sequence[Any], cache: FeatureCache) -> list[bytes | None]:
    """The content key of every item (``None`` where the item cannot be read).

    Paths go through the cache's ``(path, size, mtime)`` index first; only
    new or changed files are read and hashed.
    """
    keys: list[bytes | None] = [None] * len(items)
    stats: dict[str, tuple[int, int]] = {}
    path_positions: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(item))
            try:
                st = os.stat(path)
            except OSError:
                continue  # decoding reports the reason
            stats[path] = (st.st_size, st.st_mtime_ns)
            path_positions.setdefault(path, []).append(i)
        else:
            keys[i] = _object_key(item)
    known = cache.known_paths(stats) if stats else {}
    learned = []
    for path, positions in path_positions.items():
        key = known.get(path)
        if key is None:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            key = _digest(b"bytes", data)
            size, mtime_ns = stats[path]
            learned.append((path, size, mtime_ns, key))
        for i in positions:
            keys[i] = key
    cache.remember_paths(learned)
    return keys


def _object_key(item: Any) -> bytes | None:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _digest(b"bytes", bytes(item)) if len(item) else None
    if isinstance(item, np.ndarray):
        header = f"{item.dtype.str}|{item.shape}".encode()
        return _digest(b"array", header, np.ascontiguousarray(item).tobytes())
    if isinstance(item, Image.Image):
        orientation = item.getexif().get(0x0112, 1) if hasattr(item, "getexif") else 1
        header = f"{item.mode}|{item.size}|{orientation}".encode()
        try:
            return _digest(b"pil", header, item.tobytes())
        except (OSError, ValueError):
            return None
    return None


def _digest(kind: bytes, *parts: bytes) -> bytes:
    h = hashlib.sha256(kind)
    for part in parts:
        h.update(part)
    return h.digest()[:16]
