"""Downloading the images a CCT lists, against a real HTTP server on 127.0.0.1.

The server serves a temp folder of small real JPEGs; a handler subclass injects faults
(HTTP 500/429, a body cut short, no Content-Length, a stalled body) per path.
"""

from __future__ import annotations

import csv
import email.utils
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from urllib3 import HTTPResponse

from classification.data.download import FAILURES_FILE, download_images
from classification.data.http import Cancelled, image_url, retry_policy
from classification.errors import DataError, UserError
from tests.helpers.downloads import FAST, FILE_NAMES, FaultServer
from tests.helpers.processes import REPO_ROOT, run_entry_point

SCRIPT = "utils/download_images.py"
def write_cct(path: Path, file_names: list[str]) -> Path:
    images = [{"id": f"img{i}", "file_name": name, "width": 32, "height": 24} for i, name in enumerate(file_names)]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return path


@pytest.fixture
def cct(tmp_path: Path) -> Path:
    return write_cct(tmp_path / "cct.json", FILE_NAMES)


def assert_identical(server: FaultServer, out: Path, file_names: list[str] = FILE_NAMES) -> None:
    for name in file_names:
        assert (out / name).read_bytes() == (server.root / "images" / name).read_bytes(), name


def temp_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*.tmp")] if folder.exists() else []


# --------------------------------------------------------------------------- happy path and resume


@pytest.mark.parametrize("slash", ["", "/"])
def test_downloads_every_image_with_identical_bytes(server: FaultServer, cct: Path, tmp_path: Path, slash: str) -> None:
    out = tmp_path / "out"
    report = download_images(cct, out, server.base_url + slash, threads=4, **FAST)
    assert (report.total, report.downloaded, report.skipped, report.failed) == (4, 4, 0, 0)
    assert report.bytes_downloaded == sum((server.root / "images" / n).stat().st_size for n in FILE_NAMES)
    assert_identical(server, out)
    assert not (out / FAILURES_FILE).exists()
    assert temp_files(out) == []


def test_second_run_skips_everything_without_fetching_bodies(server: FaultServer, cct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    download_images(cct, out, server.base_url, **FAST)
    server.requests.clear()
    mtimes = {name: (out / name).stat().st_mtime_ns for name in FILE_NAMES}
    report = download_images(cct, out, server.base_url, **FAST)
    assert (report.downloaded, report.skipped, report.failed) == (0, 4, 0)
    assert server.gets() == 0
    assert sorted(path for _, path in server.requests) == sorted(f"/images/{n}" for n in FILE_NAMES)
    assert {name: (out / name).stat().st_mtime_ns for name in FILE_NAMES} == mtimes


def test_overwrite_downloads_again(server: FaultServer, cct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    download_images(cct, out, server.base_url, **FAST)
    report = download_images(cct, out, server.base_url, overwrite=True, **FAST)
    assert (report.downloaded, report.skipped) == (4, 0)
    assert_identical(server, out)


def test_incomplete_local_file_is_downloaded_again(server: FaultServer, cct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    download_images(cct, out, server.base_url, **FAST)
    full = (out / "loc1/b.jpg").read_bytes()
    (out / "loc1/b.jpg").write_bytes(full[:100])  # e.g. left by another tool
    server.requests.clear()
    report = download_images(cct, out, server.base_url, **FAST)
    assert (report.downloaded, report.skipped) == (1, 3)
    assert server.gets() == 1 and server.gets("loc1/b.jpg") == 1
    assert_identical(server, out)


def test_without_content_length_a_file_that_decodes_is_complete(server: FaultServer, cct: Path, tmp_path: Path) -> None:
    server.no_length = True
    out = tmp_path / "out"
    assert download_images(cct, out, server.base_url, **FAST).downloaded == 4
    assert_identical(server, out)
    server.requests.clear()
    report = download_images(cct, out, server.base_url, **FAST)
    assert (report.downloaded, report.skipped) == (0, 4) and server.gets() == 0
    data = (out / "e.jpg").read_bytes()
    (out / "e.jpg").write_bytes(data[: len(data) // 2])  # no longer decodes
    report = download_images(cct, out, server.base_url, **FAST)
    assert (report.downloaded, report.skipped) == (1, 3) and server.gets("e.jpg") == 1
    assert_identical(server, out)


def test_file_names_are_url_quoted_and_base_url_query_is_kept() -> None:
    assert image_url("http://h/x", "a b/c#1.jpg") == "http://h/x/a%20b/c%231.jpg"
    assert image_url("http://h/x/", "a.jpg") == "http://h/x/a.jpg"
    assert image_url("http://h", "a.jpg") == "http://h/a.jpg"
    assert image_url("https://h/c?sv=1&sig=x", "d/a.jpg") == "https://h/c/d/a.jpg?sv=1&sig=x"


def test_duplicate_file_names_are_downloaded_once(server: FaultServer, tmp_path: Path) -> None:
    cct = write_cct(tmp_path / "dup.json", ["e.jpg", "e.jpg", "loc1/a.jpg"])
    report = download_images(cct, tmp_path / "out", server.base_url, **FAST)
    assert (report.total, report.downloaded) == (2, 2) and server.gets("e.jpg") == 1


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("fault", ["500", "429", "truncate"])
def test_transient_fault_twice_is_retried_and_ends_correct(
    server: FaultServer, cct: Path, tmp_path: Path, fault: str
) -> None:
    server.faults["/images/loc1/a.jpg"] = [fault, fault]
    out = tmp_path / "out"
    report = download_images(cct, out, server.base_url, retries=3, **FAST)
    assert (report.downloaded, report.failed) == (4, 0)
    assert server.gets("loc1/a.jpg") == 3
    assert_identical(server, out)
    assert temp_files(out) == []


def test_retry_after_as_an_http_date_is_honoured_and_a_stop_ends_the_wait() -> None:
    """urllib3 reads Retry-After as seconds or as an HTTP date; the wait ends as soon as the run is stopped."""
    stop = threading.Event()
    retry = retry_policy(3, backoff_seconds=0.01, stop=stop).new()
    in_20_s = HTTPResponse(headers={"Retry-After": email.utils.formatdate(time.time() + 20, usegmt=True)}, status=503)
    after = retry.get_retry_after(in_20_s)
    assert after is not None and 15 < after <= 20
    assert retry.get_retry_after(HTTPResponse(headers={"Retry-After": "7"}, status=429)) == 7
    stop.set()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        retry.sleep(in_20_s)
    assert time.monotonic() - started < 1


def test_persistent_500_fails_after_retries(server: FaultServer, cct: Path, tmp_path: Path) -> None:
    server.always["/images/e.jpg"] = "500"
    out = tmp_path / "out"
    report = download_images(cct, out, server.base_url, retries=2, **FAST)
    assert (report.downloaded, report.failed) == (3, 1)
    assert report.failures[0].file_name == "e.jpg" and "HTTP 500" in report.failures[0].reason
    assert "after 2 retries" in report.failures[0].reason
    assert server.gets("e.jpg") == 3
    assert not (out / "e.jpg").exists()


def test_404_is_not_retried_and_is_reported(server: FaultServer, tmp_path: Path) -> None:
    cct = write_cct(tmp_path / "cct.json", [*FILE_NAMES, "gone/missing.jpg"])
    out = tmp_path / "out"
    report = download_images(cct, out, server.base_url, retries=3, **FAST)
    assert (report.downloaded, report.failed) == (4, 1)
    assert server.gets("gone/missing.jpg") == 1
    assert "missing on the server (HTTP 404" in report.failures[0].reason
    assert report.failures_csv == out / FAILURES_FILE
    assert not (out / "gone/missing.jpg").exists()


def test_truncated_body_never_leaves_a_partial_file(server: FaultServer, cct: Path, tmp_path: Path) -> None:
    server.always["/images/loc1/b.jpg"] = "truncate"
    out = tmp_path / "out"
    report = download_images(cct, out, server.base_url, retries=2, **FAST)
    assert (report.downloaded, report.failed) == (3, 1)
    assert "incomplete body" in report.failures[0].reason
    assert server.gets("loc1/b.jpg") == 3
    assert not (out / "loc1/b.jpg").exists()
    assert temp_files(out) == []


def test_truncated_body_keeps_the_previous_file_intact_on_overwrite(
    server: FaultServer, cct: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    download_images(cct, out, server.base_url, **FAST)
    before = (out / "loc1/b.jpg").read_bytes()
    server.always["/images/loc1/b.jpg"] = "truncate"
    report = download_images(cct, out, server.base_url, overwrite=True, retries=1, **FAST)
    assert report.failed == 1
    assert (out / "loc1/b.jpg").read_bytes() == before
    assert temp_files(out) == []


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_killed_mid_download_leaves_no_file_under_the_final_name(
    server: FaultServer, tmp_path: Path
) -> None:
    cct = write_cct(tmp_path / "cct.json", ["e.jpg"])
    out = tmp_path / "out"
    server.always["/images/e.jpg"] = "stall"  # half the body, then hang
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / SCRIPT), "--coco-file", str(cct), "--output-dir", str(out),
         "--base-url", server.base_url, "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert server.stalled.wait(30), "the client never started the download"
        deadline = time.monotonic() + 10
        while not temp_files(out) and time.monotonic() < deadline:  # the half body is being written
            time.sleep(0.02)
        assert temp_files(out), "the half body never reached a temporary file"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(30)
    assert not (out / "e.jpg").exists()
    server.always.clear()
    server.release.set()
    report = download_images(cct, out, server.base_url, **FAST)
    assert report.downloaded == 1
    assert_identical(server, out, ["e.jpg"])


# --------------------------------------------------------------------------- bad input and the entry point


@pytest.mark.parametrize("bad", ["../evil.jpg", "a/../../evil.jpg", "/etc/evil.jpg", "C:/evil.jpg", ""])
def test_unsafe_file_name_is_rejected_before_downloading(server: FaultServer, tmp_path: Path, bad: str) -> None:
    cct = write_cct(tmp_path / "cct.json", ["e.jpg", bad])
    with pytest.raises(DataError, match=r"images\[1\]\.file_name") as error:
        download_images(cct, tmp_path / "out", server.base_url, **FAST)
    assert "\n" not in str(error.value)
    assert server.requests == []
    assert not (tmp_path / "evil.jpg").exists()


def test_bad_settings_are_user_errors(server: FaultServer, cct: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--base-url"):
        download_images(cct, tmp_path / "out", "ftp://example.org/x", **FAST)
    with pytest.raises(UserError, match="--threads"):
        download_images(cct, tmp_path / "out", server.base_url, threads=0, **FAST)


def test_entry_point_reports_404_with_exit_code_1(server: FaultServer, tmp_path: Path) -> None:
    cct = write_cct(tmp_path / "cct.json", [*FILE_NAMES, "gone/missing.jpg"])
    out = tmp_path / "out"
    result = run_entry_point(SCRIPT, "--coco-file", cct, "--output-dir", out, "--base-url", server.base_url + "/")
    assert result.returncode == 1, result.stderr
    assert "4 downloaded" in result.stdout and "1 failed" in result.stdout
    assert "gone/missing.jpg" in result.stdout
    with open(out / FAILURES_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file_name"] for row in rows] == ["gone/missing.jpg"]
    assert "404" in rows[0]["reason"]
    assert_identical(server, out)

    # once the server has the file, a re-run fetches only it, exits 0 and removes the stale list
    (server.root / "images/gone").mkdir()
    (server.root / "images/gone/missing.jpg").write_bytes((server.root / "images/e.jpg").read_bytes())
    server.requests.clear()
    result = run_entry_point(SCRIPT, "--coco-file", cct, "--output-dir", out, "--base-url", server.base_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 downloaded" in result.stdout and "4 skipped" in result.stdout
    assert server.gets() == 1
    assert not (out / FAILURES_FILE).exists()


@pytest.mark.parametrize("content", ['{"images": [', None])
def test_entry_point_bad_json_is_one_line_and_exit_2(tmp_path: Path, content: str | None) -> None:
    cct = tmp_path / "cct.json"
    if content is not None:
        cct.write_text(content)
    result = run_entry_point(SCRIPT, "--coco-file", cct, "--output-dir", tmp_path / "out", "--base-url", "http://127.0.0.1:9/")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(cct) in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_entry_point_typo_flag_exits_2(tmp_path: Path) -> None:
    result = run_entry_point(SCRIPT, "--coco", "x.json", "--output-dir", tmp_path, "--base-url", "http://h/")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_an_image_that_cannot_be_written_fails_alone(server: FaultServer, cct: Path, tmp_path: Path) -> None:
    """A local write problem of one image (here a file where its folder should be) is that image's failure, as the
    module says: the others still download (atomic_open now reports it as a one-line DataError, which stopped the run)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "loc1").write_text("a file where the folder loc1/ should be")
    report = download_images(cct, out, server.base_url, threads=2, **FAST)
    blocked = [name for name in FILE_NAMES if name.startswith("loc1/")]
    assert blocked and report.failed == len(blocked) and report.downloaded == len(FILE_NAMES) - len(blocked)
    assert all("cannot write" in failure.reason for failure in report.failures)
    assert_identical(server, out, [name for name in FILE_NAMES if name not in blocked])


# --------------------------------------------------------------------------- one URL per file


def write_url_cct(path: Path, images: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return path


def test_each_image_is_fetched_from_its_own_url(server: FaultServer, tmp_path: Path) -> None:
    """Camtrap DP's remote media (and a LILA subset) give a URL per file, not one base URL."""
    images = [{"id": f"m{i}", "file_name": f"dep{i % 2}/{Path(name).name}", "url": f"{server.base_url}/{urllib.parse.quote(name)}"}
              for i, name in enumerate(FILE_NAMES)]
    cct = write_url_cct(tmp_path / "cct.json", images)
    result = run_entry_point(SCRIPT, "--coco-file", cct, "--output-dir", tmp_path / "out", "--threads", "2")
    assert result.returncode == 0, result.stderr
    for image, name in zip(images, FILE_NAMES):
        assert (tmp_path / "out" / image["file_name"]).read_bytes() == (server.root / "images" / name).read_bytes()
    # --cloud picks url_<cloud>; a CCT whose images lack it is one line naming the first such image
    line = run_entry_point(SCRIPT, "--coco-file", cct, "--output-dir", tmp_path / "out", "--cloud", "aws").stderr.strip()
    assert line.startswith("error:") and "images[0].url_aws: missing" in line and len(line.splitlines()) == 1


def test_dry_run_counts_files_and_bytes_and_writes_nothing(server: FaultServer, cct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    download_images(cct, out, server.base_url, threads=2, **FAST)
    (out / FILE_NAMES[0]).unlink()
    result = run_entry_point(SCRIPT, "--coco-file", cct, "--output-dir", out, "--base-url", server.base_url, "--dry-run")
    assert result.returncode == 0, result.stderr
    size = (server.root / "images" / FILE_NAMES[0]).stat().st_size
    assert f"3 already complete, would fetch 1 ({size / 1e6:.1f} MB)" in result.stdout
    assert not (out / FILE_NAMES[0]).exists() and server.gets() == len(FILE_NAMES)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/a.jpg", "/etc/passwd", "http:///no-host.jpg"])
def test_a_url_that_would_read_this_machine_is_refused_before_anything_is_fetched(server: FaultServer, tmp_path: Path, url: str) -> None:
    images = [{"id": "a", "file_name": "a.jpg", "url": f"{server.base_url}/e.jpg"}, {"id": "b", "file_name": "b.jpg", "url": url}]
    with pytest.raises(DataError, match=r"images\[1\]\.url: .* is not an http://, https:// or s3:// URL"):
        download_images(write_url_cct(tmp_path / "cct.json", images), tmp_path / "out", **FAST)
    assert server.requests == [] and not (tmp_path / "out" / "b.jpg").exists()
