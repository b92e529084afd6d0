"""A real HTTP server on 127.0.0.1 that serves small JPEGs and injects faults per path."""

from __future__ import annotations

import contextlib
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FILE_NAMES = ["loc1/a.jpg", "loc1/b.jpg", "loc 2/c d.jpg", "e.jpg"]


FAST: dict[str, Any] = {"backoff_seconds": 0.01, "timeout": 5.0, "progress": False}


@dataclass
class FaultServer:
    """A running server: where it is, what it was asked, and the faults to inject."""

    root: Path
    base_url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)
    # path -> actions consumed one per GET ("500", "429", "truncate")
    faults: dict[str, list[str]] = field(default_factory=dict)
    # path -> action on every GET ("500", "truncate", "stall"), or "*" for every path
    always: dict[str, str] = field(default_factory=dict)
    no_length: bool = False
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, file_name: str | None = None) -> int:
        return sum(
            1 for method, path in self.requests if method == "GET" and (file_name is None or path == f"/images/{file_name}")
        )

    def next_action(self, path: str) -> str | None:
        with self.lock:
            if path in self.always or "*" in self.always:
                return self.always.get(path, self.always.get("*"))
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None


class FaultyHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler that records requests and injects the server's faults."""

    state: FaultServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _path(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)

    def do_HEAD(self) -> None:
        self.state.requests.append(("HEAD", self._path()))
        if self.state.no_length:
            return self._send_without_length(body=False)
        super().do_HEAD()

    def do_GET(self) -> None:
        path = self._path()
        self.state.requests.append(("GET", path))
        action = self.state.next_action(path)
        if action in ("500", "429"):
            self.send_error(int(action))
        elif action in ("truncate", "stall"):
            data = (self.state.root / path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if action == "stall":
                self.state.stalled.set()
                self.state.release.wait(10)
            self.close_connection = True  # the body ends early: the client sees EOF
        elif self.state.no_length:
            self._send_without_length(body=True)
        else:
            super().do_GET()

    def _send_without_length(self, body: bool) -> None:
        file = self.state.root / self._path().lstrip("/")
        if not file.is_file():
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()  # no Content-Length: the body ends when the connection closes
        if body:
            self.wfile.write(file.read_bytes())
        self.close_connection = True


@contextlib.contextmanager
def serve_faults(root: Path) -> Iterator[FaultServer]:
    """Serve small JPEGs (``FILE_NAMES``) from ``root/images`` on 127.0.0.1 until the block ends (the ``server`` fixture)."""
    images = root / "images"
    rng = np.random.default_rng(0)
    for i, name in enumerate(FILE_NAMES):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(24 + 8 * i, 32 + 4 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name, quality=90)
    state = FaultServer(root=root)
    handler = type("Handler", (FaultyHandler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/images"
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
