"""Download the images a COCO Camera Traps (CCT) file lists, in parallel and resumably.

Each image's ``file_name`` (a relative path with ``/`` separators) is fetched from
``<base_url>/<url-quoted file_name>`` and stored at ``<output_dir>/<file_name>``.

Rules, chosen so that an interrupted or repeated run can be trusted:

- **Atomic writes.** A body is streamed to a temporary file beside its destination and
  moved into place with ``os.replace`` only after its size has been checked, so a crash,
  a dropped connection or Ctrl-C never leaves a partial file under the final name.
- **Size check.** When the server sends ``Content-Length``, the bytes received must
  match it exactly; a short body counts as a network error and is retried.
- **Image check.** A file whose name has an image suffix (``.jpg``, ``.png``, ...) is kept
  only when the body decodes as an image: an HTML error or login page served with status
  200 is a failure ("not an image"), never a ``.JPG`` that later runs trust.
- **Resume (what counts as complete).** Without ``overwrite``, an existing file is
  checked with a ``HEAD`` request: if the server reports a ``Content-Length``, the file
  is complete when its size equals it and (for an image name) PIL reads its header. If
  the size is unknown (no ``Content-Length``, ``HEAD`` refused, or the server
  unreachable), the file is complete when it decodes as an image with PIL. Complete
  files are skipped; anything else is downloaded again.
- **Retries.** One ``requests`` Session per thread (keep-alive) with urllib3's ``Retry``:
  connection errors, timeouts, HTTP 5xx and 429 are retried up to ``retries`` times with
  urllib3's exponential backoff (the first retry at once, then ``backoff_seconds * 2**(n-1)``,
  at most 60 s); a server's ``Retry-After``, in seconds or as an HTTP date, is honoured
  instead, up to the same cap. A body cut short is noticed while streaming, after urllib3 has
  returned, and counted by its own copy of the same policy (same limit, same backoff).
  Other HTTP errors (404 and 410 reported as missing, 401, 403, ...) are not retried.
- **Failures** never stop the run: they are counted, listed in the summary and written
  to ``<output_dir>/download_failures.csv`` (``file_name,reason``). A stale failures
  list from an earlier run is removed when a run ends with no failures.
- **Safety.** A ``file_name`` that is absolute or contains ``..`` would write outside
  ``output_dir``; the whole CCT is rejected before anything is downloaded.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import sys
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, TypeVar

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from classification.data.images import has_image_suffix, is_valid_image
from classification.errors import DataError, UserError
from classification.io import atomic_open, read_json

log = logging.getLogger(__name__)

FAILURES_FILE = "download_failures.csv"
USER_AGENT = "classification-download/0.1 (camera-trap classifier framework)"
CHUNK_SIZE = 1 << 16
MAX_BACKOFF_SECONDS = 60
MISSING_STATUSES = frozenset({404, 410})
RETRY_STATUSES = frozenset({429, *range(500, 600)})
SUMMARY_FAILURES_SHOWN = 10

Outcome = Literal["downloaded", "skipped", "failed"]
T = TypeVar("T")


@dataclass(frozen=True)
class DownloadFailure:
    """One image that could not be downloaded, and why."""

    file_name: str
    reason: str


@dataclass
class DownloadReport:
    """What ``download_images`` did: counts, failures and where the failures list is."""

    total: int = 0
    downloaded: int = 0
    skipped: int = 0
    bytes_downloaded: int = 0
    failures: list[DownloadFailure] = field(default_factory=list)
    failures_csv: Path | None = None

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        return not self.failures

    def count(self, file_name: str, outcome: Outcome, size: int, reason: str) -> None:
        """Add one image's outcome to the counts (or to the failures)."""
        if outcome == "downloaded":
            self.downloaded += 1
            self.bytes_downloaded += size
        elif outcome == "skipped":
            self.skipped += 1
        else:
            self.failures.append(DownloadFailure(file_name, reason))

    def summary(self) -> str:
        """A few lines for the terminal: counts, then the first failures with reasons."""
        lines = [
            f"{self.total} images: {self.downloaded} downloaded ({self.bytes_downloaded / 1e6:.1f} MB), "
            f"{self.skipped} skipped (already complete), {self.failed} failed"
        ]
        for failure in self.failures[:SUMMARY_FAILURES_SHOWN]:
            lines.append(f"  failed: {failure.file_name}: {failure.reason}")
        if self.failed > SUMMARY_FAILURES_SHOWN:
            lines.append(f"  ... and {self.failed - SUMMARY_FAILURES_SHOWN} more")
        if self.failures_csv is not None:
            lines.append(f"failures listed in {self.failures_csv}")
        return "\n".join(lines)


class _BodyError(Exception):
    """The body ended early or the connection dropped while reading it: worth another GET."""


class _Permanent(Exception):
    """A problem another attempt will not fix (404, 403, retries spent, a folder in the way, ...)."""


class _Cancelled(Exception):
    """The run is being stopped (Ctrl-C in the main thread)."""


# --------------------------------------------------------------------------- inputs


def check_file_name(file_name: Any, where: str) -> str:
    """Return ``file_name`` if it is a safe relative path; else raise a one-line DataError."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{where}: missing or not a non-empty string")
    parts = file_name.replace("\\", "/").split("/")
    if file_name.startswith(("/", "\\")) or (len(file_name) > 1 and file_name[1] == ":"):
        raise DataError(f"{where}: {file_name!r} is an absolute path; expected a path relative to the output folder")
    if ".." in parts:
        raise DataError(f"{where}: {file_name!r} contains '..' and would write outside the output folder")
    if "\x00" in file_name:
        raise DataError(f"{where}: {file_name!r} contains a NUL character")
    return file_name


def image_file_names(data: Any, source: str | Path) -> list[str]:
    """The distinct, validated ``file_name`` of every image in a CCT dict, in file order."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{source}: images: missing or not a list (is this a COCO Camera Traps file?)")
    names: dict[str, None] = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise DataError(f"{source}: images[{i}]: not an object")
        names[check_file_name(image.get("file_name"), f"{source}: images[{i}].file_name")] = None
    duplicates = len(data["images"]) - len(names)
    if duplicates:
        log.info("%s: %d images share a file_name with another; each file is downloaded once", source, duplicates)
    return list(names)


def image_url(base_url: str, file_name: str) -> str:
    """``base_url`` joined with the URL-quoted ``file_name``; a query (e.g. a SAS token) is kept."""
    parts = urllib.parse.urlsplit(base_url)
    path = parts.path.rstrip("/") + "/" + urllib.parse.quote(file_name, safe="/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _check_base_url(base_url: str) -> None:
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--base-url {base_url!r}: expected an http:// or https:// URL")


def _check_settings(threads: int, retries: int, timeout: float, backoff_seconds: float, base_url: str) -> None:
    """One-line UserError for a setting out of range (before anything is read or downloaded)."""
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if retries < 0:
        raise UserError(f"--retries must be 0 or more, got {retries}")
    if not timeout > 0:
        raise UserError(f"--timeout must be positive, got {timeout}")
    if backoff_seconds < 0:
        raise UserError(f"backoff must be 0 or more seconds, got {backoff_seconds}")
    _check_base_url(base_url)


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
            raise _Cancelled()


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
            raise _Permanent(f"network error: {_network_reason(error)}{_after(self.retries)}") from None
        if response.status_code < 400:
            return response
        history = getattr(response.raw, "retries", None)
        status = f"HTTP {response.status_code} {response.reason or ''}".strip()
        response.close()
        if response.status_code in MISSING_STATUSES:
            raise _Permanent(f"missing on the server ({status})")
        raise _Permanent(f"{status}{_after(len(history.history) if history is not None else 0)}")

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
            raise _Cancelled()
        try:
            return attempt()
        except _BodyError as error:
            try:
                retry = retry.increment(method="GET", url=url, error=error)
            except MaxRetryError:
                raise _Permanent(f"{error}{_after(http.retries)}") from None
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
                raise _Cancelled()
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
    except _Permanent as error:
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
    except _Permanent as error:
        raise OSError(f"cannot download {url}: {error}") from None


def _check_image_body(handle: Any, received: int, content_type: str | None) -> None:
    """Refuse a body that is not an image (an HTML error or login page served with status 200)."""
    handle.flush()
    handle.seek(0)
    if not is_valid_image(handle):
        raise _Permanent(f"not an image: the server sent {received} bytes of {content_type or 'unknown type'}"
                         " that do not decode (an error or login page?)")


def _fetch(http: Http, url: str, destination: Path, verify_image: bool) -> int:
    """One GET of ``url`` into ``destination`` (atomically); returns the bytes written. ``verify_image``: the body
    must decode as an image before it is kept."""
    with http.open(url, "GET") as response, atomic_open(destination, "w+b") as handle:
        received = receive_body(response, handle, http.stop)
        if verify_image:
            _check_image_body(handle, received, response.headers.get("Content-Type"))
    return received


# --------------------------------------------------------------------------- one image


@dataclass
class _Settings:
    output_dir: Path
    base_url: str
    overwrite: bool
    http: Http


def _is_complete(destination: Path, url: str, settings: _Settings) -> bool:
    """The resume rule in the module docstring: size vs Content-Length and an image header, else decodability."""
    if settings.overwrite or not destination.is_file():
        return False
    size = _remote_size(settings.http, url)
    image = has_image_suffix(destination)
    if size is not None:
        return destination.stat().st_size == size and (not image or is_valid_image(destination, header_only=True))
    return is_valid_image(destination) if image else False


def _download_one(file_name: str, settings: _Settings) -> tuple[Outcome, int, str]:
    """Download (or skip) one image; returns its outcome, the bytes written and a reason."""
    destination = settings.output_dir / PurePosixPath(file_name)
    url = image_url(settings.base_url, file_name)
    if destination.is_dir():
        return "failed", 0, f"{destination} is a folder"
    try:
        if _is_complete(destination, url, settings):
            return "skipped", 0, ""
        verify = has_image_suffix(file_name)
        size = with_body_retries(lambda: _fetch(settings.http, url, destination, verify), settings.http, url)
        return "downloaded", size, ""
    except _Permanent as error:
        return "failed", 0, str(error)
    except OSError as error:  # local disk problems: permissions, disk full, ...
        return "failed", 0, f"cannot write {destination}: {error.strerror or error}"
    except DataError as error:  # the same, as atomic_open reports them (a file where a folder should be, ...)
        return "failed", 0, f"cannot write {destination}: {str(error).removeprefix(f'{destination}: ')}"


# --------------------------------------------------------------------------- the run


def write_failures(path: Path, failures: list[DownloadFailure]) -> None:
    """Write the failures list as CSV (``file_name,reason``), atomically."""
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file_name", "reason"])
        for failure in failures:
            writer.writerow([failure.file_name, failure.reason])


def _prepare_output_dir(output_dir: str | Path) -> Path:
    """The output folder, created if missing; a file in its place is a UserError."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir}: exists and is not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def _run_downloads(file_names: list[str], settings: _Settings, threads: int, show: bool) -> DownloadReport:
    """Download every file in ``threads`` threads; on any exception (Ctrl-C) stop the others and re-raise."""
    report = DownloadReport(total=len(file_names))
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="download")
    try:
        futures: dict[Future[tuple[Outcome, int, str]], str] = {
            executor.submit(_download_one, name, settings): name for name in file_names}
        with tqdm(total=len(futures), unit="img", desc="download", disable=not show) as bar:
            for future in as_completed(futures):
                report.count(futures[future], *future.result())
                bar.update()
                bar.set_postfix(failed=report.failed, refresh=False)
    except BaseException:
        settings.http.stop.set()  # in-flight downloads stop at their next chunk or wait; temp files are removed
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)
    return report


def _write_or_remove_failures(report: DownloadReport, output_dir: Path) -> None:
    """Sort the failures and list them in ``download_failures.csv``; remove a stale list when there are none."""
    report.failures.sort(key=lambda failure: failure.file_name)
    failures_path = output_dir / FAILURES_FILE
    if report.failures:
        write_failures(failures_path, report.failures)
        report.failures_csv = failures_path
    elif failures_path.exists():
        failures_path.unlink()  # stale: every image is now present


def download_images(
    cct_path: str | Path,
    output_dir: str | Path,
    base_url: str,
    threads: int = 8,
    retries: int = 3,
    timeout: float = 30.0,
    overwrite: bool = False,
    backoff_seconds: float = 1.0,
    progress: bool | None = None,
) -> DownloadReport:
    """Download every image of the CCT file ``cct_path`` from ``base_url`` into ``output_dir``.

    Bad input (a missing or malformed CCT, an unsafe ``file_name``, bad settings) raises a
    one-line ``UserError``/``DataError`` before anything is downloaded; failed downloads do
    not raise but are returned in the report. ``progress=None`` shows a bar on a terminal.
    """
    _check_settings(threads, retries, timeout, backoff_seconds, base_url)
    file_names = image_file_names(read_json(cct_path), cct_path)
    output = _prepare_output_dir(output_dir)
    http = Http(retries, backoff_seconds, timeout)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        report = _run_downloads(file_names, _Settings(output, base_url, overwrite, http), threads, show)
    finally:
        http.close()
    _write_or_remove_failures(report, output)
    return report
