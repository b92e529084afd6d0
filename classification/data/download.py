"""Download the images a COCO Camera Traps (CCT) file lists, in parallel and resumably.

Every file to fetch is a ``DownloadItem``: where it goes (``<output_dir>/<file_name>``) and
the one URL it comes from. A CCT gives each image's URL in one of these ways, in this order:

- ``base_url`` joined with the URL-quoted ``file_name`` (``--base-url``, http(s) or ``s3://bucket/prefix``);
- a per-image URL field: ``url_<cloud>`` of a LILA subset (``--cloud gcp|aws|azure``), or ``url``
  (Camtrap DP's remote media, a LILA subset's chosen cloud), or any field named by ``--url-field``;
- ``serving_bucket_key``, the image's key in Animl's serving bucket (``s3://<bucket>/<key>``).

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
  checked against the server's size (``HEAD``; S3's ``HeadObject``): if it is known, the file
  is complete when its size equals it and (for an image name) PIL reads its header. If
  the size is unknown (no ``Content-Length``, ``HEAD`` refused, or the server
  unreachable), the file is complete when it decodes as an image with PIL. Complete
  files are skipped; anything else is downloaded again.
- **Retries.** HTTP (``classification.data.http``): one ``requests`` Session per thread with
  urllib3's ``Retry``: connection errors, timeouts, HTTP 5xx and 429 are retried up to ``retries``
  times with exponential backoff (the first retry at once, then ``backoff_seconds * 2**(n-1)``, at
  most 60 s); a server's ``Retry-After`` is honoured instead, up to the same cap; a body cut short
  counts against the same policy. S3 (``classification.data.s3``): botocore's standard retries,
  and a body cut short fetched again. Other errors (404 and 410 reported as missing, 401, 403,
  ...) are not retried.
- **Failures** never stop the run: they are counted, listed in the summary and written
  to ``<output_dir>/download_failures.csv`` (``file_name,reason``). A stale failures
  list from an earlier run is removed when a run ends with no failures.
- **Safety.** A ``file_name`` that is absolute or contains ``..`` would write outside
  ``output_dir``, and a URL that is not http(s) or s3 (``file:///etc/passwd``) would read this
  machine: the whole CCT is rejected before anything is downloaded.
"""

from __future__ import annotations

import csv
import logging
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol, TypeVar

from tqdm import tqdm

from classification.data.http import FetchError, Http, image_url
from classification.data.images import has_image_suffix, is_valid_image
from classification.data.s3 import ANIML_SERVING_BUCKET, AwsOptions, S3Transport
from classification.errors import DataError, UserError
from classification.io import atomic_open, read_json

log = logging.getLogger(__name__)

FAILURES_FILE = "download_failures.csv"
SUMMARY_FAILURES_SHOWN = 10
URL_SCHEMES = ("http", "https", "s3")

Outcome = Literal["downloaded", "skipped", "failed"]
T = TypeVar("T")


@dataclass(frozen=True)
class DownloadItem:
    """One file to fetch: its path under the output folder and the URL it comes from."""

    file_name: str
    url: str


@dataclass(frozen=True)
class ImageUrls:
    """How a CCT's images name their URLs (the module docstring's order): at most one of ``base_url``/``url_field``."""

    base_url: str | None = None
    url_field: str | None = None
    bucket: str = ANIML_SERVING_BUCKET  # a name or s3://bucket/prefix, for serving_bucket_key


@dataclass(frozen=True)
class Connection:
    """How to reach the servers: retries and timeouts, and for ``s3://`` URLs the AWS profile, region and endpoint."""

    retries: int = 3
    timeout: float = 30.0
    backoff_seconds: float = 1.0
    aws: AwsOptions = field(default_factory=AwsOptions)


class Transport(Protocol):
    """What a URL scheme's client does for the downloader (``Http``, ``S3Transport``)."""

    def size(self, url: str) -> int | None: ...

    def fetch(self, url: str, destination: Path, verify_image: bool) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DownloadFailure:
    """One image that could not be downloaded, and why."""

    file_name: str
    reason: str


@dataclass
class DownloadReport:
    """What ``download_files`` did: counts, failures and where the failures list is."""

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


@dataclass
class DownloadPlan:
    """What a run would fetch (``--dry-run``): files already complete, files to fetch and their bytes where known."""

    total: int = 0
    complete: int = 0
    to_fetch: int = 0
    bytes_to_fetch: int = 0
    unknown_sizes: int = 0

    def summary(self) -> str:
        unknown = f" (+{self.unknown_sizes} of unknown size)" if self.unknown_sizes else ""
        return (f"dry run: {self.total} images: {self.complete} already complete, would fetch {self.to_fetch} "
                f"({self.bytes_to_fetch / 1e6:.1f} MB{unknown})")


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


def check_url(url: Any, where: str) -> str:
    """Return ``url`` if it is an http(s) or s3 URL with a host; else a one-line DataError (``file://`` reads this machine)."""
    if not isinstance(url, str) or not url.strip():
        raise DataError(f"{where}: missing or not a non-empty string")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in URL_SCHEMES or not parts.netloc:
        raise DataError(f"{where}: {url!r} is not an http://, https:// or s3:// URL")
    return url


def join_url(base_url: str, file_name: str) -> str:
    """``base_url`` joined with ``file_name``: URL-quoted for http(s), as the key's rest for ``s3://bucket/prefix``."""
    if base_url.startswith("s3://"):
        return base_url.rstrip("/") + "/" + file_name.replace("\\", "/")
    return image_url(base_url, file_name.replace("\\", "/"))


def bucket_url(bucket: str) -> str:
    """``s3://<bucket>[/prefix]`` from a bucket name or an ``s3://`` URL (``--bucket``)."""
    url = bucket if bucket.startswith("s3://") else f"s3://{bucket}"
    if not urllib.parse.urlsplit(url).netloc or "/" in bucket.removeprefix("s3://").split("/")[0]:
        raise UserError(f"--bucket {bucket!r}: expected a bucket name or s3://bucket/prefix")
    return url


def image_download_url(image: Mapping[str, Any], urls: ImageUrls, where: str) -> str:
    """The URL of one CCT image, by the module docstring's order; an image with none is a one-line DataError."""
    if urls.base_url is not None:
        return join_url(urls.base_url, str(image["file_name"]))
    if urls.url_field is not None:
        return check_url(image.get(urls.url_field), f"{where}.{urls.url_field}")
    if image.get("url") is not None:
        return check_url(image["url"], f"{where}.url")
    if image.get("serving_bucket_key") is not None:
        key = check_file_name(image["serving_bucket_key"], f"{where}.serving_bucket_key")
        return join_url(bucket_url(urls.bucket), key)
    raise DataError(f"{where}: no URL (no url or serving_bucket_key field): give --base-url, --cloud or --url-field")


def cct_download_items(data: Any, source: str | Path, urls: ImageUrls) -> list[DownloadItem]:
    """One ``DownloadItem`` per distinct, validated ``file_name`` of a CCT dict, in file order."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{source}: images: missing or not a list (is this a COCO Camera Traps file?)")
    items: dict[str, DownloadItem] = {}
    for i, image in enumerate(data["images"]):
        where = f"{source}: images[{i}]"
        if not isinstance(image, dict):
            raise DataError(f"{where}: not an object")
        name = check_file_name(image.get("file_name"), f"{where}.file_name")
        if name not in items:
            items[name] = DownloadItem(name, image_download_url(image, urls, where))
    duplicates = len(data["images"]) - len(items)
    if duplicates:
        log.info("%s: %d images share a file_name with another; each file is downloaded once", source, duplicates)
    return list(items.values())


def check_items(items: Iterable[DownloadItem], where: str = "download") -> list[DownloadItem]:
    """The items with safe file names and supported URLs (each problem a one-line DataError)."""
    checked = list(items)
    for item in checked:
        check_file_name(item.file_name, f"{where}: {item.file_name!r}: file_name")
        check_url(item.url, f"{where}: {item.file_name}: url")
    return checked


def _check_settings(threads: int, connection: Connection) -> None:
    """One-line UserError for a setting out of range (before anything is read or downloaded)."""
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if connection.retries < 0:
        raise UserError(f"--retries must be 0 or more, got {connection.retries}")
    if not connection.timeout > 0:
        raise UserError(f"--timeout must be positive, got {connection.timeout}")
    if connection.backoff_seconds < 0:
        raise UserError(f"backoff must be 0 or more seconds, got {connection.backoff_seconds}")


def _check_base_url(base_url: str | None) -> None:
    if base_url is None:
        return
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in URL_SCHEMES or not parts.netloc:
        raise UserError(f"--base-url {base_url!r}: expected an http://, https:// or s3://bucket/prefix URL")


# --------------------------------------------------------------------------- transports


class Transports:
    """One client per URL scheme, made on first use and shared by the threads; ``stop`` ends their transfers."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.stop = threading.Event()
        self._clients: dict[str, Transport] = {}
        self._lock = threading.Lock()

    def for_url(self, url: str) -> Transport:
        return self._client("s3" if url.startswith("s3://") else "http")

    def _client(self, scheme: str) -> Transport:
        with self._lock:
            if scheme not in self._clients:
                c = self.connection
                self._clients[scheme] = (S3Transport(c.aws, c.retries, c.timeout, self.stop) if scheme == "s3"
                                         else Http(c.retries, c.backoff_seconds, c.timeout, self.stop))
            return self._clients[scheme]

    def open_all(self, items: Sequence[DownloadItem]) -> None:
        """Make the clients these items need now, so that a missing AWS profile is one error before any download."""
        for scheme in sorted({"s3" if item.url.startswith("s3://") else "http" for item in items}):
            self._client(scheme)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


# --------------------------------------------------------------------------- one image


def _complete_at(destination: Path, size: int | None) -> bool:
    """The resume rule in the module docstring, given the server's size: that size and an image header, else decodability."""
    if not destination.is_file():
        return False
    image = has_image_suffix(destination)
    if size is not None:
        return destination.stat().st_size == size and (not image or is_valid_image(destination, header_only=True))
    return is_valid_image(destination) if image else False


def _download_one(item: DownloadItem, output_dir: Path, transports: Transports, overwrite: bool) -> tuple[Outcome, int, str]:
    """Download (or skip) one file; returns its outcome, the bytes written and a reason."""
    destination = output_dir / PurePosixPath(item.file_name.replace("\\", "/"))
    if destination.is_dir():
        return "failed", 0, f"{destination} is a folder"
    transport = transports.for_url(item.url)
    try:
        if not overwrite and destination.is_file() and _complete_at(destination, transport.size(item.url)):
            return "skipped", 0, ""
        return "downloaded", transport.fetch(item.url, destination, has_image_suffix(item.file_name)), ""
    except FetchError as error:
        return "failed", 0, str(error)
    except OSError as error:  # local disk problems: permissions, disk full, ...
        return "failed", 0, f"cannot write {destination}: {error.strerror or error}"
    except DataError as error:  # the same, as atomic_open reports them (a file where a folder should be, ...)
        return "failed", 0, f"cannot write {destination}: {str(error).removeprefix(f'{destination}: ')}"


def _planned(item: DownloadItem, output_dir: Path, transports: Transports, overwrite: bool) -> tuple[bool, int | None]:
    """For a dry run: whether the file is already complete, and the server's size of it."""
    destination = output_dir / PurePosixPath(item.file_name.replace("\\", "/"))
    size = transports.for_url(item.url).size(item.url)
    return not overwrite and _complete_at(destination, size), size


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


def _bytes_postfix(done: int, started: float) -> str:
    """'12.3 MB at 4.5 MB/s' for the progress bar."""
    elapsed = max(time.monotonic() - started, 1e-6)
    return f"{done / 1e6:.1f} MB at {done / 1e6 / elapsed:.1f} MB/s"


def _in_threads(work: Callable[[DownloadItem], T], items: Sequence[DownloadItem], threads: int, transports: Transports,
                on_result: Callable[[DownloadItem, T], str], show: bool, desc: str) -> None:
    """Run ``work`` on every item in ``threads`` threads with a progress bar (its postfix from ``on_result``);
    on any exception (Ctrl-C) stop the others and re-raise."""
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="download")
    try:
        futures: dict[Future[T], DownloadItem] = {executor.submit(work, item): item for item in items}
        with tqdm(total=len(futures), unit="img", desc=desc, disable=not show) as bar:
            for future in as_completed(futures):
                bar.set_postfix_str(on_result(futures[future], future.result()), refresh=False)
                bar.update()
    except BaseException:
        transports.stop.set()  # in-flight downloads stop at their next chunk or wait; temp files are removed
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


def _write_or_remove_failures(report: DownloadReport, output_dir: Path) -> None:
    """Sort the failures and list them in ``download_failures.csv``; remove a stale list when there are none."""
    report.failures.sort(key=lambda failure: failure.file_name)
    failures_path = output_dir / FAILURES_FILE
    if report.failures:
        write_failures(failures_path, report.failures)
        report.failures_csv = failures_path
    elif failures_path.exists():
        failures_path.unlink()  # stale: every image is now present


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def download_files(items: Iterable[DownloadItem], output_dir: str | Path, threads: int = 8, overwrite: bool = False,
                   connection: Connection | None = None, progress: bool | None = None) -> DownloadReport:
    """Download every item into ``output_dir`` (the module docstring's rules); failures are in the report, not raised.

    Bad input (an unsafe ``file_name``, a URL that is not http(s)/s3, bad settings, a missing AWS profile)
    raises a one-line ``UserError``/``DataError`` before anything is downloaded. ``progress=None`` shows a
    bar (images, MB and MB/s, time left) on a terminal.
    """
    connection = connection or Connection()
    _check_settings(threads, connection)
    checked = check_items(items)
    output = _prepare_output_dir(output_dir)
    report = DownloadReport(total=len(checked))
    transports = Transports(connection)
    started = time.monotonic()

    def counted(item: DownloadItem, result: tuple[Outcome, int, str]) -> str:
        report.count(item.file_name, *result)
        return f"{_bytes_postfix(report.bytes_downloaded, started)}, {report.failed} failed"

    try:
        transports.open_all(checked)
        _in_threads(lambda item: _download_one(item, output, transports, overwrite), checked, threads, transports,
                    counted, _show(progress), "download")
    finally:
        transports.close()
    _write_or_remove_failures(report, output)
    return report


def plan_downloads(items: Iterable[DownloadItem], output_dir: str | Path, threads: int = 8, overwrite: bool = False,
                   connection: Connection | None = None, progress: bool | None = None) -> DownloadPlan:
    """What ``download_files`` would fetch, from the servers' sizes (HEAD requests): nothing is written."""
    connection = connection or Connection()
    _check_settings(threads, connection)
    checked = check_items(items)
    plan = DownloadPlan(total=len(checked))
    transports = Transports(connection)

    def counted(item: DownloadItem, result: tuple[bool, int | None]) -> str:
        complete, size = result
        if complete:
            plan.complete += 1
        else:
            plan.to_fetch += 1
            plan.bytes_to_fetch += size or 0
            plan.unknown_sizes += size is None
        return f"{plan.bytes_to_fetch / 1e6:.1f} MB to fetch"

    try:
        transports.open_all(checked)
        _in_threads(lambda item: _planned(item, Path(output_dir), transports, overwrite), checked, threads, transports,
                    counted, _show(progress), "dry run")
    finally:
        transports.close()
    return plan


def download_images(
    cct_path: str | Path,
    output_dir: str | Path,
    base_url: str | None = None,
    threads: int = 8,
    retries: int = 3,
    timeout: float = 30.0,
    overwrite: bool = False,
    backoff_seconds: float = 1.0,
    progress: bool | None = None,
    url_field: str | None = None,
    bucket: str = ANIML_SERVING_BUCKET,
    aws: AwsOptions | None = None,
) -> DownloadReport:
    """Download every image of the CCT file ``cct_path`` into ``output_dir``, each from its URL (module docstring)."""
    connection = Connection(retries, timeout, backoff_seconds, aws or AwsOptions())
    _check_settings(threads, connection)
    _check_base_url(base_url)
    items = cct_download_items(read_json(cct_path), cct_path, ImageUrls(base_url, url_field, bucket))
    return download_files(items, output_dir, threads, overwrite, connection, progress)


def plan_image_downloads(cct_path: str | Path, output_dir: str | Path, base_url: str | None = None, threads: int = 8,
                         url_field: str | None = None, bucket: str = ANIML_SERVING_BUCKET,
                         connection: Connection | None = None, progress: bool | None = None) -> DownloadPlan:
    """``download_images`` as a dry run: how many files and bytes it would fetch."""
    _check_base_url(base_url)
    items = cct_download_items(read_json(cct_path), cct_path, ImageUrls(base_url, url_field, bucket))
    return plan_downloads(items, output_dir, threads, False, connection, progress)
