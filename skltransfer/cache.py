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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CacheInfo", "FeatureCache", "cached_features", "content_keys", "default_cache_dir", "feature_config_id"]

CACHE_DIR_ENV = "SKLTRANSFER_CACHE_DIR"
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
"""


def default_cache_dir() -> Path:
    """``$SKLTRANSFER_CACHE_DIR``, else ``$XDG_CACHE_HOME/skltransfer``, else ``~/.cache/skltransfer``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "skltransfer"


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


class FeatureCache:
    """A feature store on disk, safe to share between processes.

    Parameters
    ----------
    directory : str or PathLike, optional
        Where the database lives (created if missing). Default:
        :func:`~skltransfer.cache.default_cache_dir`.
    max_bytes : int, optional
        Size limit for stored features; least recently used rows are evicted
        past it. ``None``: no limit.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> cache = FeatureCache(tempfile.mkdtemp())
    >>> cache.put("cfg", [b"k1"], np.ones((1, 3), np.float32))
    >>> cache.get("cfg", [b"k1", b"k2"], 3)[b"k1"]
    array([1., 1., 1.], dtype=float32)
    >>> cache.info()["entries"]
    1
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int | None = None):
        self.directory = directory
        self.max_bytes = max_bytes

    # Parameters only: the connection is per process and never pickled.
    def __getstate__(self):
        return {"directory": self.directory, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"FeatureCache(directory={str(self.path.parent)!r}, max_bytes={self.max_bytes!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, FeatureCache) and self.__getstate__() == other.__getstate__()

    def __hash__(self) -> int:
        return hash((str(self.directory), self.max_bytes))

    @property
    def path(self) -> Path:
        directory = Path(self.directory) if self.directory is not None else default_cache_dir()
        return directory.expanduser().resolve() / _DB_NAME

    @property
    def engine_directory(self) -> Path:
        """Where converted inference-engine models live, next to the database."""
        return self.path.parent / "engines"

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

        The rows are views into one matrix read in bulk.
        """
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
        """Store rows (one transaction: all of them or none)."""
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
            if self.max_bytes is not None:
                self._evict(conn)

        if rows:
            self._run(write)

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
        killed process never blocks the others.
        """
        with file_lock(self.path.parent / "locks" / f"{config}.lock"):
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
        """Entries, feature bytes, configurations and the file's size on disk; engine conversions kept."""

        def read(conn):
            entries, stored = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(vec)), 0) FROM features"
            ).fetchone()
            (configs,) = conn.execute("SELECT COUNT(DISTINCT config) FROM features").fetchone()
            (paths,) = conn.execute("SELECT COUNT(*) FROM paths").fetchone()
            return entries, stored, configs, paths

        entries, stored, configs, paths = self._run(read)
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
        }

    def clear(self) -> None:
        """Delete every stored feature, path index entry and engine conversion."""

        def wipe(conn):
            with conn:
                conn.execute("DELETE FROM features")
                conn.execute("DELETE FROM paths")
            conn.execute("VACUUM")

        self._run(wipe)
        shutil.rmtree(self.engine_directory, ignore_errors=True)


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

    Without POSIX locks (Windows) it does not lock: the work it guards is
    then done twice at worst, never wrongly.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


#: ``compute(items, keep)``: the rows of ``items``, calling ``keep(positions, rows)`` after
#: every batch; raises ``ImageLoadError`` (positions in ``items``) after computing the rest.
Compute = Callable[[Sequence[Any], Callable[[list[int], np.ndarray], None]], np.ndarray]


def cached_features(
    store: FeatureCache, config: str, items: Sequence[Any], width: int, compute: Compute
) -> tuple[np.ndarray, CacheInfo]:
    """Rows for ``items`` under configuration ``config``: stored ones read, only the rest computed.

    The protocol, in one place: content keys; hits read in bulk; the
    configuration's compute lock (one process computes a configuration at a
    time, others wait and then read its rows); a second read after the wait;
    every computed batch stored as it arrives, so an error or a kill loses at
    most the batch in flight.

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
    from .decoding import ImageLoadError

    keys = content_keys(items, store)
    features = np.empty((len(items), width), dtype=np.float32)

    def fill(found: dict, positions: list[int]) -> list[int]:
        """Copy found rows in; return the positions still missing."""
        hit = [i for i in positions if keys[i] in found]
        if hit:
            features[hit] = np.stack([found[keys[i]] for i in hit])
        return [i for i in positions if keys[i] not in found]

    missing = fill(store.get(config, keys, width), list(range(len(items))))
    if missing:
        with store.computing(config):
            # Another process may have computed some of them while we waited.
            missing = fill(store.get(config, [keys[i] for i in missing], width), missing)

            def keep(positions: list[int], rows: np.ndarray) -> None:
                store.put(config, [keys[missing[j]] for j in positions], rows)

            if missing:
                try:
                    features[missing] = compute([items[i] for i in missing], keep)
                except ImageLoadError as exc:  # positions in the misses -> positions in items
                    if exc.rows is not None:
                        features[missing] = exc.rows
                    raise ImageLoadError(
                        [dataclasses.replace(f, index=missing[f.index]) for f in exc.failures],
                        rows=None if exc.rows is None else features,
                    ) from None
    return features, CacheInfo(len(items) - len(missing), len(missing), 0.0)


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
