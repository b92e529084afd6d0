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
- **Retries.** Network errors, short bodies, HTTP 5xx and 429 are retried up to
  ``retries`` times with exponential backoff (``backoff_seconds * 2**attempt``, at most
  60 s; a server's ``Retry-After`` is honoured up to the same cap). Other HTTP errors
  (404 and 410 reported as missing, 401, 403, ...) are not retried.
- **Failures** never stop the run: they are counted, listed in the summary and written
  to ``<output_dir>/download_failures.csv`` (``file_name,reason``). A stale failures
  list from an earlier run is removed when a run ends with no failures.
- **Safety.** A ``file_name`` that is absolute or contains ``..`` would write outside
  ``output_dir``; the whole CCT is rejected before anything is downloaded.
"""

from __future__ import annotations

import csv
import http.client
import logging
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Literal, TypeVar

from tqdm import tqdm

from classification.errors import DataError, UserError
from classification.data.images import has_image_suffix, is_valid_image
from classification.io import atomic_open, read_json

log = logging.getLogger(__name__)

FAILURES_FILE = "download_failures.csv"
USER_AGENT = "classification-download/0.1 (camera-trap classifier framework)"
CHUNK_SIZE = 1 << 16
MAX_BACKOFF_SECONDS = 60.0
MISSING_STATUSES = frozenset({404, 410})
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


class _Retryable(Exception):
    """A transient problem (network, 5xx, 429, short body): worth another attempt."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Permanent(Exception):
    """A problem another attempt will not fix (404, 403, a folder in the way, ...)."""


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


# --------------------------------------------------------------------------- HTTP


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _content_length(headers: Any) -> int | None:
    value = headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def _open(url: str, method: str, timeout: float) -> http.client.HTTPResponse:
    """Open ``url``; classify failures as ``_Retryable`` or ``_Permanent``."""
    request = urllib.request.Request(url, method=method, headers={"User-Agent": USER_AGENT})  # noqa: S310 (scheme checked)
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (scheme checked)
    except urllib.error.HTTPError as error:
        error.close()
        status = f"HTTP {error.code} {error.reason}".strip()
        if error.code in MISSING_STATUSES:
            raise _Permanent(f"missing on the server ({status})") from None
        if error.code == 429 or error.code >= 500:
            raise _Retryable(status, _retry_after(error.headers)) from None
        raise _Permanent(status) from None
    except urllib.error.URLError as error:
        raise _Retryable(f"network error: {error.reason}") from None
    except (http.client.HTTPException, OSError) as error:  # timeouts, resets, bad status lines
        raise _Retryable(f"network error: {type(error).__name__}: {error}") from None


def _with_retries(
    attempt: Callable[[], T], retries: int, backoff_seconds: float, stop: threading.Event
) -> T:
    """Call ``attempt`` until it succeeds, fails permanently, or ``retries`` retries are spent."""
    for tries in range(retries + 1):
        if stop.is_set():
            raise _Cancelled()
        try:
            return attempt()
        except _Retryable as error:
            if tries == retries:
                suffix = f" (after {retries} {'retry' if retries == 1 else 'retries'})" if retries else ""
                raise _Permanent(f"{error}{suffix}") from None
            delay = min(backoff_seconds * 2**tries, MAX_BACKOFF_SECONDS)
            if error.retry_after is not None:
                delay = min(max(delay, error.retry_after), MAX_BACKOFF_SECONDS)
            log.debug("retrying in %.2fs: %s", delay, error)
            if stop.wait(delay):
                raise _Cancelled() from None
    raise AssertionError("unreachable")


def _remote_size(url: str, timeout: float, retries: int, backoff_seconds: float, stop: threading.Event) -> int | None:
    """The server's ``Content-Length`` for ``url`` from a HEAD request, or None when unknown."""

    def head() -> int | None:
        with _open(url, "HEAD", timeout) as response:
            return _content_length(response.headers)

    try:
        return _with_retries(head, retries, backoff_seconds, stop)
    except _Permanent as error:
        log.debug("%s: size unknown (%s)", url, error)
        return None


def fetch_bytes(url: str, retries: int = 2, timeout: float = 60.0, backoff_seconds: float = 0.5) -> bytes:
    """The whole body at ``url`` in memory, with the same retry rules; a failure raises ``OSError``."""

    def get() -> bytes:
        with _open(url, "GET", timeout) as response:
            expected = _content_length(response.headers)
            try:
                body = response.read()
            except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
                raise _Retryable(f"network error while reading: {type(error).__name__}: {error}") from None
            if expected is not None and len(body) != expected:
                raise _Retryable(f"incomplete body: received {len(body)} of {expected} bytes")
            return body

    try:
        return _with_retries(get, retries, backoff_seconds, threading.Event())
    except _Permanent as error:
        raise OSError(f"cannot download {url}: {error}") from None


def _check_image_body(handle: Any, received: int, content_type: str | None) -> None:
    """Refuse a body that is not an image (an HTML error or login page served with status 200)."""
    handle.flush()
    handle.seek(0)
    if not is_valid_image(handle):
        raise _Permanent(f"not an image: the server sent {received} bytes of {content_type or 'unknown type'}"
                         " that do not decode (an error or login page?)")


def _fetch(url: str, destination: Path, timeout: float, stop: threading.Event, verify_image: bool = False) -> int:
    """One GET of ``url`` into ``destination`` (atomically); returns the bytes written. ``verify_image``: the body
    must decode as an image before it is kept."""
    with _open(url, "GET", timeout) as response:
        expected = _content_length(response.headers)
        received = 0
        try:
            with atomic_open(destination, "w+b") as handle:
                while True:
                    if stop.is_set():
                        raise _Cancelled()
                    chunk = response.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    handle.write(chunk)
                    received += len(chunk)
                    if expected is not None and received > expected:
                        raise _Retryable(f"body longer than Content-Length {expected}")
                if expected is not None and received != expected:
                    raise _Retryable(f"incomplete body: received {received} of {expected} bytes")
                if verify_image:
                    _check_image_body(handle, received, response.headers.get("Content-Type"))
        except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
            raise _Retryable(f"network error while reading: {type(error).__name__}: {error}") from None
        return received


# --------------------------------------------------------------------------- one image


@dataclass
class _Settings:
    output_dir: Path
    base_url: str
    timeout: float
    retries: int
    backoff_seconds: float
    overwrite: bool
    stop: threading.Event


def _is_complete(destination: Path, url: str, settings: _Settings) -> bool:
    """The resume rule in the module docstring: size vs Content-Length and an image header, else decodability."""
    if settings.overwrite or not destination.is_file():
        return False
    size = _remote_size(url, settings.timeout, settings.retries, settings.backoff_seconds, settings.stop)
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
        size = _with_retries(
            lambda: _fetch(url, destination, settings.timeout, settings.stop, has_image_suffix(file_name)),
            settings.retries,
            settings.backoff_seconds,
            settings.stop,
        )
        return "downloaded", size, ""
    except _Permanent as error:
        return "failed", 0, str(error)
    except OSError as error:  # local disk problems: permissions, disk full, ...
        return "failed", 0, f"cannot write {destination}: {error.strerror or error}"


# --------------------------------------------------------------------------- the run


def write_failures(path: Path, failures: list[DownloadFailure]) -> None:
    """Write the failures list as CSV (``file_name,reason``), atomically."""
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file_name", "reason"])
        for failure in failures:
            writer.writerow([failure.file_name, failure.reason])


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
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if retries < 0:
        raise UserError(f"--retries must be 0 or more, got {retries}")
    if not timeout > 0:
        raise UserError(f"--timeout must be positive, got {timeout}")
    if backoff_seconds < 0:
        raise UserError(f"backoff must be 0 or more seconds, got {backoff_seconds}")
    _check_base_url(base_url)
    file_names = image_file_names(read_json(cct_path), cct_path)

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir}: exists and is not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)

    settings = _Settings(output_dir, base_url, timeout, retries, backoff_seconds, overwrite, threading.Event())
    report = DownloadReport(total=len(file_names))
    show = sys.stderr.isatty() if progress is None else progress
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="download")
    try:
        futures = {executor.submit(_download_one, name, settings): name for name in file_names}
        with tqdm(total=len(futures), unit="img", desc="download", disable=not show) as bar:
            for future in as_completed(futures):
                outcome, size, reason = future.result()
                if outcome == "downloaded":
                    report.downloaded += 1
                    report.bytes_downloaded += size
                elif outcome == "skipped":
                    report.skipped += 1
                else:
                    report.failures.append(DownloadFailure(futures[future], reason))
                bar.update()
                bar.set_postfix(failed=report.failed, refresh=False)
    except BaseException:
        settings.stop.set()  # in-flight downloads stop at their next chunk; temp files are removed
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)

    report.failures.sort(key=lambda failure: failure.file_name)
    failures_path = output_dir / FAILURES_FILE
    if report.failures:
        write_failures(failures_path, report.failures)
        report.failures_csv = failures_path
    elif failures_path.exists():
        failures_path.unlink()  # stale: every image is now present
    return report
