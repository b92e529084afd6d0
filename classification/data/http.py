"""HTTP for downloads: keep-alive sessions, urllib3 retries with backoff, bodies checked against their length.

The rules (what is retried, how long it waits, what a short body is) are those of
``classification.data.download``'s module docstring; this module is the transport that
``download`` uses for ``http://`` and ``https://`` URLs, and ``fetch_bytes`` for one file in memory.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from classification.data.images import is_valid_image
from classification.io import atomic_open

log = logging.getLogger(__name__)

USER_AGENT = "classification-download/0.1 (camera-trap classifier framework)"
CHUNK_SIZE = 1 << 16
MAX_BACKOFF_SECONDS = 60
MISSING_STATUSES = frozenset({404, 410})
RETRY_STATUSES = frozenset({429, *range(500, 600)})

T = TypeVar("T")


def image_url(base_url: str, file_name: str) -> str:
    """``base_url`` joined with the URL-quoted ``file_name``; a query (e.g. a SAS token) is kept."""
    parts = urllib.parse.urlsplit(base_url)
    path = parts.path.rstrip("/") + "/" + urllib.parse.quote(file_name, safe="/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class _BodyError(Exception):
    """The body ended early or the connection dropped while reading it: worth another GET."""


class FetchError(Exception):
    """A problem another attempt will not fix (404, 403, retries spent, not an image, ...): the file's failure reason."""


class Cancelled(Exception):
    """The run is being stopped (Ctrl-C in the main thread): in-flight transfers end at their next chunk or wait."""


# --------------------------------------------------------------------------- HTTP


class StoppableRetry(Retry):
    """urllib3's ``Retry`` whose waits (backoff, ``Retry-After``) end early when the run is stopped."""

    def __init__(self, *args: Any, stop: threading.Event | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop if stop is not None else threading.Event()

    def new(self, **kw: Any) -> StoppableRetry:
        """The next state of the policy (urllib3 builds one per retry); it keeps the stop event."""
        retry = super().new(**kw)
        retry.stop = self.stop
        return retry

    def sleep(self, response: Any = None) -> None:
        """Wait the server's ``Retry-After`` (seconds or an HTTP date) if it sent one, else the backoff."""
        retry_after = self.get_retry_after(response) if self.respect_retry_after_header and response is not None else None
        delay = retry_after if retry_after else self.get_backoff_time()
        if delay > 0 and self.stop.wait(delay):
            raise Cancelled()


def retry_policy(retries: int, backoff_seconds: float, stop: threading.Event) -> StoppableRetry:
    """``retries`` retries of GET/HEAD on connection and read errors, HTTP 5xx and 429, with exponential backoff."""
    return StoppableRetry(total=retries, status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET", "HEAD"}),
                          backoff_factor=backoff_seconds, backoff_max=MAX_BACKOFF_SECONDS,
                          retry_after_max=MAX_BACKOFF_SECONDS, raise_on_status=False, stop=stop)


def _after(retries: int) -> str:
    """' (after 2 retries)', or '' when none were made."""
    return f" (after {retries} {'retry' if retries == 1 else 'retries'})" if retries else ""


def _content_length(headers: Any) -> int | None:
    value = headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


class Http:
    """HTTP with keep-alive and urllib3 retries: one ``requests`` Session per thread, all with the same policy."""

    def __init__(self, retries: int, backoff_seconds: float, timeout: float, stop: threading.Event | None = None) -> None:
        self.retries = retries
        self.timeout = timeout
        self.stop = stop if stop is not None else threading.Event()
        self.retry = retry_policy(retries, backoff_seconds, self.stop)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        """This thread's session (created on first use): requests' Session is not meant to be shared by threads."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=self.retry)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            # identity: Content-Length then counts the bytes written, not those of a compressed body
            session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def open(self, url: str, method: str) -> requests.Response:
        """Send one request (urllib3 retries what is transient) and return a streaming 2xx response."""
        try:
            response = self.session().request(method, url, timeout=self.timeout, stream=True, allow_redirects=True)
        except requests.RequestException as error:  # connection errors and timeouts, retries spent
            raise FetchError(f"network error: {_network_reason(error)}{_after(self.retries)}") from None
        if response.status_code < 400:
            return response
        history = getattr(response.raw, "retries", None)
        status = f"HTTP {response.status_code} {response.reason or ''}".strip()
        response.close()
        if response.status_code in MISSING_STATUSES:
            raise FetchError(f"missing on the server ({status})")
        raise FetchError(f"{status}{_after(len(history.history) if history is not None else 0)}")

    def size(self, url: str) -> int | None:
        """The server's ``Content-Length`` for ``url`` (a HEAD request), or None when unknown."""
        return _remote_size(self, url)

    def fetch(self, url: str, destination: Path, verify_image: bool) -> int:
        """GET ``url`` into ``destination`` atomically, a body cut short retried; returns the bytes written."""
        return with_body_retries(lambda: _fetch(self, url, destination, verify_image), self, url)

    def close(self) -> None:
        """Close every thread's session (their kept-alive connections)."""
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


def _network_reason(error: requests.RequestException) -> str:
    """The underlying reason of a requests error (urllib3's MaxRetryError wraps the last one)."""
    reason: Any = error.args[0] if error.args else error
    if isinstance(reason, MaxRetryError) and reason.reason is not None:
        reason = reason.reason
    return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)


def with_body_retries(attempt: Callable[[], T], http: Http, url: str) -> T:
    """Call ``attempt``; a body cut short counts against the same urllib3 ``Retry`` policy (its limit, its backoff).

    urllib3 retries a request until its headers arrive; a streamed body that ends early is
    noticed later, here, and sent back through ``Retry.increment``/``Retry.sleep``.
    """
    retry: Retry = http.retry
    while True:
        if http.stop.is_set():
            raise Cancelled()
        try:
            return attempt()
        except _BodyError as error:
            try:
                retry = retry.increment(method="GET", url=url, error=error)
            except MaxRetryError:
                raise FetchError(f"{error}{_after(http.retries)}") from None
            log.debug("retrying %s: %s", url, error)
            retry.sleep()


def receive_body(response: requests.Response, handle: IO[bytes], stop: threading.Event) -> int:
    """Stream the body into ``handle``; returns the bytes written. A body shorter or longer than its
    ``Content-Length``, or a connection dropped while reading, is a ``_BodyError``."""
    expected = _content_length(response.headers)
    received = 0
    try:
        for chunk in response.iter_content(CHUNK_SIZE):
            if stop.is_set():
                raise Cancelled()
            handle.write(chunk)
            received += len(chunk)
            if expected is not None and received > expected:
                raise _BodyError(f"body longer than Content-Length {expected}")
    except requests.RequestException as error:  # urllib3 checks Content-Length too: a short body ends here
        if expected is None or received >= expected:
            raise _BodyError(f"network error while reading: {_network_reason(error)}") from None
    if expected is not None and received != expected:
        raise _BodyError(f"incomplete body: received {received} of {expected} bytes")
    return received


def _remote_size(http: Http, url: str) -> int | None:
    """The server's ``Content-Length`` for ``url`` from a HEAD request, or None when unknown."""
    try:
        with http.open(url, "HEAD") as response:
            return _content_length(response.headers)
    except FetchError as error:
        log.debug("%s: size unknown (%s)", url, error)
        return None


@functools.lru_cache(maxsize=8)
def _shared_http(process: int, retries: int, backoff_seconds: float, timeout: float) -> Http:
    """One ``Http`` per process and settings, so that repeated ``fetch_bytes`` calls keep their connections."""
    return Http(retries, backoff_seconds, timeout)


def fetch_bytes(url: str, retries: int = 2, timeout: float = 60.0, backoff_seconds: float = 0.5) -> bytes:
    """The whole body at ``url`` in memory, with the same retry rules; a failure raises ``OSError``."""
    http = _shared_http(os.getpid(), retries, backoff_seconds, timeout)

    def get() -> bytes:
        buffer = io.BytesIO()
        with http.open(url, "GET") as response:
            receive_body(response, buffer, http.stop)
        return buffer.getvalue()

    try:
        return with_body_retries(get, http, url)
    except FetchError as error:
        raise OSError(f"cannot download {url}: {error}") from None


def check_image_body(handle: Any, received: int, content_type: str | None) -> None:
    """Refuse a body that is not an image (an HTML error or login page served with status 200)."""
    handle.flush()
    handle.seek(0)
    if not is_valid_image(handle):
        raise FetchError(f"not an image: the server sent {received} bytes of {content_type or 'unknown type'}"
                         " that do not decode (an error or login page?)")


def _fetch(http: Http, url: str, destination: Path, verify_image: bool) -> int:
    """One GET of ``url`` into ``destination`` (atomically); returns the bytes written. ``verify_image``: the body
    must decode as an image before it is kept."""
    with http.open(url, "GET") as response, atomic_open(destination, "w+b") as handle:
        received = receive_body(response, handle, http.stop)
        if verify_image:
            check_image_body(handle, received, response.headers.get("Content-Type"))
    return received
