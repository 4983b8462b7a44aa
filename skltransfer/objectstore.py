"""The feature cache's shared tier: batches of feature rows as immutable objects in object storage.

One job: store and find feature rows under an fsspec URL that many machines
share (``s3://bucket/prefix``, ``gs://``, ``az://``, ``file:///mnt/nfs/...``,
``memory://``), with no lock and no server of ours.

* **Layout**: ``<url>/v1/<configuration>/<n>-<digest>.rows``, one object per
  batch of ``n`` rows. The digest is the sha256 of the object's bytes: two
  writers of the same rows write the same object, two writers of overlapping
  batches write two objects and either serves. Objects are never changed,
  so what a process has read of them stays true.
* **An object**: a header (magic, ``n``, width, the ``n`` content keys, a
  CRC32 per row, a CRC32 of the header), then the ``n`` float32 rows. The
  name gives ``n``, so a reader fetches the header alone (a range read), and
  the listed size must be the size the header promises. A partly written
  object (S3's PUT is atomic; a shared disk's write is not) is skipped and
  looked at again later; a damaged row is a miss. Neither is ever returned
  as features.
* **Requests** (batched, never one per image): a lookup lists the
  configuration once, reads the headers of objects it has not seen before in
  one batched range read, then the rows it wants in one more (one range per
  object). A write is one PUT of a batch.
* **Credentials** never live here: they come from where the backend looks
  for them (the environment, its config files, an instance role), so they
  travel with no model file, cache key, pickle or message. Options that
  carry a secret are refused (:func:`check_no_credentials`).

Faults are reported, not handled: every call has a deadline and raises on
failure; :class:`~skltransfer.cache.FeatureCache` decides what that means
(warn once, compute, keep the rows locally, upload them later).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ObjectStore", "check_no_credentials", "is_url", "public_url", "redact"]

_MAGIC = b"SKLTFR01"
_FIXED = struct.Struct("<8sII")  # magic, n, width
_KEY_BYTES = 16
_LAYOUT = "v1"
_NAME = re.compile(r"^(\d+)-[0-9a-f]{32}\.rows$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: Option names that carry a secret (s3fs, gcsfs, adlfs, botocore): refused, never stored.
_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential|sas|signature|connection_string", re.I)
#: Values of a ``token`` option that name a method, not a secret (gcsfs).
_NOT_SECRET = {"anon", "google_default", "cloud", "browser", "cache"}
#: s3fs's option for the endpoint's address is no secret, whatever the pattern says.
_ALLOWED = {"endpoint_url", "use_listings_cache", "skip_instance_cache", "kms_key_id"}


def is_url(location: Any) -> bool:
    """Whether ``location`` is an fsspec URL (``scheme://...``) rather than a local folder.

    >>> is_url("s3://bucket/features"), is_url("/tmp/cache"), is_url("C:/cache")
    (True, False, False)
    """
    return isinstance(location, str) and bool(_URL.match(location))


def public_url(url: str) -> str:
    """The URL without any ``user:password@`` part, for messages.

    >>> public_url("s3://AKIA:hunter2@bucket/prefix")
    's3://***@bucket/prefix'
    """
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@", r"\1***@", url)


def redact(text: str) -> str:
    """``text`` with URL credentials, request signatures and secret environment values masked.

    Defence in depth for messages built from a backend's exceptions, which
    should hold no secret anyway.

    >>> redact("GET https://u:p@host/o?X-Amz-Signature=abc123&x=1 failed")
    'GET https://***@host/o?X-Amz-Signature=***&x=1 failed'
    """
    text = re.sub(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]*@", r"\1***@", text)
    text = re.sub(r"((?:Signature|Credential|Security-Token|sig|token)=)[^&\s\"']+", r"\1***", text,
                  flags=re.I)
    for name, value in os.environ.items():
        if len(value) >= 6 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def check_no_credentials(url: str, storage_options: dict | None) -> None:
    """Refuse a URL or options that carry a secret, saying where secrets go instead.

    Raises
    ------
    ValueError
        Naming the option (never its value).

    Examples
    --------
    >>> check_no_credentials("s3://bucket/f", {"endpoint_url": "http://127.0.0.1:9000"})
    >>> check_no_credentials("s3://bucket/f", {"secret": "..."})
    Traceback (most recent call last):
    ...
    ValueError: storage option 'secret' holds a credential: ...
    """
    where = ("give credentials the way the storage backend reads them (environment variables such as "
             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, its config file, an instance role), so that they "
             "never travel with a model file, a pickle or a message")
    if public_url(url) != url:
        raise ValueError(f"the cache URL {public_url(url)!r} holds credentials: {where}")

    def walk(options: dict, prefix: str) -> None:
        for name, value in options.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            elif (name not in _ALLOWED and _SECRET_NAME.search(str(name)) and value not in (None, False)
                  and not (isinstance(value, str) and value in _NOT_SECRET)):
                raise ValueError(f"storage option '{prefix}{name}' holds a credential: {where}")

    walk(dict(storage_options or {}), "")


@dataclass
class _Header:
    keys: list[bytes]
    crcs: np.ndarray
    width: int
    size: int  # header bytes: the rows start here


@dataclass
class _Index:
    """What this process knows of one configuration's objects (immutable, so never stale)."""

    objects: dict[str, _Header] = field(default_factory=dict)
    where: dict[bytes, tuple[str, int]] = field(default_factory=dict)
    damaged: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, path: str, header: _Header) -> None:
        self.objects[path] = header
        for row, key in enumerate(header.keys):
            self.where.setdefault(key, (path, row))

    def forget(self, path: str) -> None:
        self.objects.pop(path, None)
        self.where = {k: v for k, v in self.where.items() if v[0] != path}


_INDEXES: dict[tuple[str, str], _Index] = {}
_INDEXES_LOCK = threading.Lock()


def _header_size(n: int) -> int:
    return _FIXED.size + n * (_KEY_BYTES + 4) + 4


def encode(keys: Sequence[bytes], rows: np.ndarray) -> bytes:
    """One object's bytes: header, then the rows.

    >>> data = encode([b"k" * 16], np.ones((1, 2), np.float32))
    >>> decode_header(data, 1).keys == [b"k" * 16], len(data) == _header_size(1) + 8
    (True, True)
    """
    rows = np.ascontiguousarray(rows, dtype="<f4")
    n, width = rows.shape
    if len(keys) != n or any(len(k) != _KEY_BYTES for k in keys):
        raise ValueError(f"need {n} keys of {_KEY_BYTES} bytes")
    crcs = np.array([zlib.crc32(row.tobytes()) for row in rows], dtype="<u4")
    head = _FIXED.pack(_MAGIC, n, width) + b"".join(keys) + crcs.tobytes()
    return head + struct.pack("<I", zlib.crc32(head)) + rows.tobytes()


def decode_header(data: bytes, n: int) -> _Header | None:
    """The header of an object of ``n`` rows, or None if it is not a valid one."""
    size = _header_size(n)
    if len(data) < size:
        return None
    magic, count, width = _FIXED.unpack_from(data)
    head = data[: size - 4]
    if magic != _MAGIC or count != n or struct.unpack_from("<I", data, size - 4)[0] != zlib.crc32(head):
        return None
    start = _FIXED.size
    keys = [bytes(data[start + i * _KEY_BYTES : start + (i + 1) * _KEY_BYTES]) for i in range(n)]
    crcs = np.frombuffer(data, dtype="<u4", count=n, offset=start + n * _KEY_BYTES)
    return _Header(keys, crcs, width, size)


class ObjectStore:
    """Feature rows under an fsspec URL, shared by every machine that can reach it.

    Parameters
    ----------
    url : str
        Any fsspec URL: ``s3://bucket/prefix``, ``gs://...``, ``az://...``,
        ``file:///shared/disk/features``, ``memory://features``.
    storage_options : dict, optional
        Passed to the fsspec filesystem (``endpoint_url``, ``anon``,
        ``client_kwargs`` ...); no credentials (:func:`check_no_credentials`).
    timeout : float
        Seconds any one call may take before it raises ``TimeoutError``.

    Examples
    --------
    >>> store = ObjectStore("memory://doctest-features")
    >>> store.put("cfg", [b"a" * 16, b"b" * 16], np.arange(6, dtype=np.float32).reshape(2, 3))
    >>> store.get("cfg", [b"b" * 16, b"c" * 16], 3)
    {b'bbbbbbbbbbbbbbbb': array([3., 4., 5.], dtype=float32)}
    >>> store.clear()
    """

    def __init__(self, url: str, storage_options: dict | None = None, timeout: float = 30.0):
        check_no_credentials(url, storage_options)
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.timeout = timeout
        self._fs = None
        self._root = ""

    def __repr__(self) -> str:
        return f"ObjectStore({public_url(self.url)!r})"

    # -- plumbing -----------------------------------------------------------------

    def _filesystem(self):
        if self._fs is None:
            import fsspec

            self._fs, root = fsspec.url_to_fs(self.url, **self.storage_options)
            self._root = root.rstrip("/")
        return self._fs

    def _folder(self, config: str) -> str:
        self._filesystem()
        return f"{self._root}/{_LAYOUT}/{config}"

    def _call(self, function: Callable, *args, **kwargs):
        """``function(*args, **kwargs)`` with a deadline.

        A daemon thread: a backend that hangs past its own timeouts cannot
        hold the caller, nor keep the process alive at exit.
        """
        outcome: dict[str, Any] = {}

        def run():
            try:
                outcome["value"] = function(*args, **kwargs)
            except BaseException as exc:  # handed to the caller below
                outcome["error"] = exc

        worker = threading.Thread(target=run, name="skltransfer-objectstore", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise TimeoutError(f"no answer from {public_url(self.url)} within {self.timeout:g} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _index(self, config: str) -> _Index:
        with _INDEXES_LOCK:
            return _INDEXES.setdefault((self.url, config), _Index())

    # -- rows ---------------------------------------------------------------------

    def get(self, config: str, keys: Sequence[bytes | None], width: int) -> dict[bytes, np.ndarray]:
        """The stored rows of the keys that have one (damaged or partly written objects count as absent)."""
        wanted = [k for k in dict.fromkeys(keys) if k is not None]
        if not wanted:
            return {}
        return self._call(self._get, config, wanted, width)

    def _get(self, config: str, wanted: list[bytes], width: int) -> dict[bytes, np.ndarray]:
        index = self._index(config)
        with index.lock:
            if any(k not in index.where for k in wanted):
                self._refresh(config, index)
            plan: dict[str, list[tuple[bytes, int]]] = {}
            for key in wanted:
                if key in index.where:
                    path, row = index.where[key]
                    if index.objects[path].width == width:
                        plan.setdefault(path, []).append((key, row))
            if not plan:
                return {}
            paths = list(plan)
            spans = [(min(r for _, r in plan[p]), max(r for _, r in plan[p]) + 1) for p in paths]
            starts = [index.objects[p].size + lo * 4 * width for p, (lo, _) in zip(paths, spans)]
            ends = [index.objects[p].size + hi * 4 * width for p, (_, hi) in zip(paths, spans)]
            blobs = self._filesystem().cat_ranges(paths, starts, ends, on_error="return")
            found: dict[bytes, np.ndarray] = {}
            for path, (lo, hi), blob in zip(paths, spans, blobs):
                if isinstance(blob, FileNotFoundError):
                    index.forget(path)  # cleared by someone: a miss, and looked for again next time
                    continue
                if isinstance(blob, BaseException):
                    raise blob
                if len(blob) != (hi - lo) * 4 * width:
                    continue
                matrix = np.frombuffer(blob, dtype="<f4").reshape(hi - lo, width)
                crcs = index.objects[path].crcs
                for key, row in plan[path]:
                    values = matrix[row - lo]
                    if zlib.crc32(values.tobytes()) == crcs[row]:
                        found[key] = values.astype(np.float32, copy=False)
            return found

    def _refresh(self, config: str, index: _Index) -> None:
        """List the configuration; read the headers of objects not seen before (one batched read)."""
        fs = self._filesystem()
        folder = self._folder(config)
        fs.invalidate_cache(folder)
        try:
            entries = fs.ls(folder, detail=True)
        except FileNotFoundError:
            entries = []
        new = []
        for entry in entries:
            path = entry["name"]
            match = _NAME.match(path.rsplit("/", 1)[-1])
            if match and path not in index.objects and path not in index.damaged:
                n = int(match.group(1))
                if n > 0 and (entry.get("size") or 0) > _header_size(n):
                    new.append((path, n, entry["size"]))
        if not new:
            return
        heads = fs.cat_ranges([p for p, _, _ in new], [0] * len(new), [_header_size(n) for _, n, _ in new],
                              on_error="return")
        for (path, n, size), data in zip(new, heads):
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                raise data
            header = decode_header(data, n)
            if header is None:
                if len(data) == _header_size(n):
                    index.damaged.add(path)  # a whole header that does not check: never trusted
                continue
            if size == header.size + 4 * n * header.width:
                index.add(path, header)
            # else: still being written (a shared disk): looked at again next time

    def put(self, config: str, keys: Sequence[bytes], rows: np.ndarray) -> None:
        """Store rows as one object (one request); an object of the same rows is written once."""
        rows = np.asarray(rows, dtype=np.float32)
        if not len(keys):
            return
        data = encode(list(keys), rows)
        folder = self._folder(config)
        path = f"{folder}/{len(keys)}-{hashlib.sha256(data).hexdigest()[:32]}.rows"
        self._call(self._write, folder, path, data)
        index = self._index(config)
        with index.lock:
            index.add(path, decode_header(data, len(keys)))

    def _write(self, folder: str, path: str, data: bytes) -> None:
        fs = self._filesystem()
        if _is_local(fs):
            # A local or mounted disk: write aside, then rename (atomic), so readers see all or nothing.
            fs.makedirs(folder, exist_ok=True)
            partial = f"{path}.partial-{os.getpid()}-{threading.get_ident()}"
            fs.pipe_file(partial, data)
            fs.mv(partial, path)
        else:
            fs.pipe_file(path, data)

    # -- looking after it -----------------------------------------------------------

    def keys(self, config: str) -> set[bytes]:
        """Every content key the store holds a valid row for, under ``config`` (reads every header)."""

        def read():
            index = self._index(config)
            with index.lock:
                self._refresh(config, index)
                return set(index.where)

        return self._call(read)

    def info(self) -> dict[str, Any]:
        """Objects, rows (a row written twice counts twice), bytes and configurations in the store.

        ``rows_by_configuration``: rows written under each configuration id,
        duplicates included: on a cluster that shares the store, the number
        of images it computed.
        """

        def read():
            fs = self._filesystem()
            base = f"{self._root}/{_LAYOUT}"
            fs.invalidate_cache(base)
            try:
                entries = fs.find(base, detail=True)
            except FileNotFoundError:
                entries = {}
            objects = rows = stored = 0
            configs: dict[str, int] = {}
            for path, entry in entries.items():
                match = _NAME.match(path.rsplit("/", 1)[-1])
                if match:
                    objects += 1
                    rows += int(match.group(1))
                    stored += entry.get("size") or 0
                    config = path.rsplit("/", 2)[-2]
                    configs[config] = configs.get(config, 0) + int(match.group(1))
            return {"url": public_url(self.url), "objects": objects, "rows": rows, "bytes": stored,
                    "configurations": len(configs), "rows_by_configuration": dict(sorted(configs.items()))}

        return self._call(read)

    def clear(self) -> None:
        """Delete every object this store holds (every machine's rows)."""

        def wipe():
            fs = self._filesystem()
            base = f"{self._root}/{_LAYOUT}"
            try:
                fs.rm(base, recursive=True)
            except FileNotFoundError:
                pass
            fs.invalidate_cache(base)

        self._call(wipe)
        with _INDEXES_LOCK:
            for key in [k for k in _INDEXES if k[0] == self.url]:
                del _INDEXES[key]


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)
