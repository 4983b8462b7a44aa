"""A real S3-compatible endpoint on 127.0.0.1 for the tests and benchmarks/cluster_cache.py.

``S3Server``: moto's server mode in a subprocess (as s3fs's own test suite
runs it), stopped on exit. ``Gate``: a TCP relay in front of it that can be
closed (the store unreachable: connections refused) or stalled (the store
slow: connections accepted, nothing answered) and opened again, while the
data behind it stays. Every loop is bounded in time; everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

BUCKET = "skltransfer-test"
#: Made-up credentials moto accepts; the tests check that they never leak.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIATESTSKLTRANSFER", "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-printed-0123",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """``with S3Server() as s3: s3.endpoint`` -> ``http://127.0.0.1:<port>`` with bucket ``BUCKET`` made."""

    def __init__(self, startup_seconds: float = 60.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.startup_seconds = startup_seconds
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> S3Server:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | CREDENTIALS,
        )
        deadline = time.monotonic() + self.startup_seconds
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"moto server did not start on {self.endpoint}") from None
                time.sleep(0.1)
        request = urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Gate:
    """A TCP relay ``127.0.0.1:<port>`` -> ``target``: ``close()``, ``stall()``, ``open()``, ``stop()``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.mode = "closed"
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        self.open()

    def open(self) -> None:
        self._set("open")

    def stall(self) -> None:
        """Accept connections, answer nothing (a store that hangs)."""
        self._set("stall")

    def close(self) -> None:
        """Refuse new connections and cut the open ones (a store that is down)."""
        self._set("closed")

    def stop(self) -> None:
        self._stopped = True
        self.close()

    def _set(self, mode: str) -> None:
        with self._lock:
            for conn in self._connections:
                _shut(conn)
            self._connections.clear()
            if self._listener is not None:
                _shut(self._listener)
                self._listener = None
            self.mode = mode
            if mode == "closed":
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            listener.settimeout(0.2)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener, mode), daemon=True).start()

    def _accept(self, listener: socket.socket, mode: str) -> None:
        while not self._stopped and self._listener is listener:
            try:
                client, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self._connections.append(client)
            if mode == "stall":
                continue  # held open, never answered, until the mode changes
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _shut(client)
                continue
            with self._lock:
                self._connections.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    source.settimeout(None)
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _shut(sink)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
