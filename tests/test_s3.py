"""S3Transport against a real S3-compatible server (moto's, on 127.0.0.1): bytes, sizes, failures, profiles, Ctrl-C.

The server runs in this process; every test gets a fresh environment with fake credentials and
temporary AWS files, so the user's own ~/.aws and AWS_* variables are never read.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from moto.server import ThreadedMotoServer
from PIL import Image

from classification.data import s3
from classification.data.http import CHUNK_SIZE, Cancelled, FetchError
from classification.data.s3 import ANIML_SERVING_BUCKET, AwsOptions, S3Transport, s3_url, split_s3_url
from classification.errors import UserError
from tests.helpers.processes import run_entry_point

ACCESS_KEY = "AKIATESTINGFAKEKEY01"
SECRET_KEY = "fake-secret-Zq7vXw9-never-shown"
SMALL_KEY = "images/site-a/small.jpg"
LARGE_KEY = "images/site-a/large.jpg"  # several chunks: a transfer that can be stopped midway
HTML_KEY = "images/site-b/login.jpg"  # a .jpg key whose body is an HTML page
PUBLIC_KEY = "public/sample.jpg"  # readable by anyone (ACL public-read); the others are private


def _jpeg(width: int, height: int, seed: int) -> bytes:
    """A real JPEG of random noise (noise barely compresses, so the size grows with the area)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


OBJECTS = {SMALL_KEY: _jpeg(64, 48, 0), LARGE_KEY: _jpeg(400, 300, 1), HTML_KEY: b"<html><body>Please sign in</body></html>",
           PUBLIC_KEY: _jpeg(32, 32, 2)}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port), with Animl's bucket holding ``OBJECTS``."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    setup = boto3.client("s3", endpoint_url=url, region_name=s3.ANIML_REGION, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    setup.create_bucket(Bucket=ANIML_SERVING_BUCKET, CreateBucketConfiguration={"LocationConstraint": s3.ANIML_REGION})
    for key, body in OBJECTS.items():
        setup.put_object(Bucket=ANIML_SERVING_BUCKET, Key=key, Body=body, ContentType="text/html" if key == HTML_KEY else "image/jpeg",
                         ACL="public-read" if key == PUBLIC_KEY else "private")
    setup.close()
    yield url
    server.stop()


@pytest.fixture
def aws_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No AWS_* variable of the user's, a temporary HOME and AWS files, no instance-metadata probe: nothing real is read."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / ".aws" / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return home


@pytest.fixture
def env_credentials(aws_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake keys in the environment, as a user's shell would have them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


def _transport(endpoint: str, retries: int = 1, profile: str | None = None, anonymous: bool = False) -> S3Transport:
    options = AwsOptions(profile=profile, endpoint_url=endpoint, anonymous=anonymous)
    return S3Transport(options, retries=retries, timeout=5.0, stop=threading.Event())


def _url(key: str) -> str:
    return s3_url(ANIML_SERVING_BUCKET, key)


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob("*") if path.is_file())


# --------------------------------------------------------------------------- URLs


def test_split_s3_url_round_trips_keys_as_they_are() -> None:
    assert split_s3_url("s3://animl-images-serving-prod/a/b c%20.jpg") == ("animl-images-serving-prod", "a/b c%20.jpg")
    assert s3_url(*split_s3_url("s3://bucket/x/y.JPG")) == "s3://bucket/x/y.JPG"


@pytest.mark.parametrize("url", ["https://bucket/key.jpg", "s3://", "s3://bucket", "s3://bucket/", "s3:///key.jpg", "s3://bucket/folder/"])
def test_split_s3_url_refuses_malformed_urls_in_one_line(url: str) -> None:
    with pytest.raises(ValueError, match="s3://") as caught:
        split_s3_url(url)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- against the server


def test_fetch_writes_the_same_bytes_and_size_matches(endpoint: str, env_credentials: None, tmp_path: Path) -> None:
    transport = _transport(endpoint)
    try:
        for key in (SMALL_KEY, LARGE_KEY):
            destination = tmp_path / "out" / Path(key).name
            assert transport.size(_url(key)) == len(OBJECTS[key])
            assert transport.fetch(_url(key), destination, verify_image=True) == len(OBJECTS[key])
            assert destination.read_bytes() == OBJECTS[key]
        assert _leftovers(tmp_path / "out") == ["large.jpg", "small.jpg"]
    finally:
        transport.close()


def test_missing_key_and_bucket_are_failures_size_unknown(endpoint: str, env_credentials: None, tmp_path: Path) -> None:
    transport = _transport(endpoint)
    with pytest.raises(FetchError, match=r"^missing on the server \(S3 NoSuchKey\)$"):
        transport.fetch(_url("images/nope.jpg"), tmp_path / "nope.jpg", verify_image=True)
    with pytest.raises(FetchError, match="^no such bucket: no-such-bucket-here$"):
        transport.fetch("s3://no-such-bucket-here/a.jpg", tmp_path / "a.jpg", verify_image=True)
    assert transport.size(_url("images/nope.jpg")) is None
    assert transport.size("s3://no-such-bucket-here/a.jpg") is None
    assert transport.size("not-an-s3-url") is None
    assert _leftovers(tmp_path) == []


def test_a_page_under_a_jpg_key_is_not_kept(endpoint: str, env_credentials: None, tmp_path: Path) -> None:
    transport = _transport(endpoint)
    with pytest.raises(FetchError, match="not an image") as caught:
        transport.fetch(_url(HTML_KEY), tmp_path / "login.jpg", verify_image=True)
    assert "text/html" in str(caught.value)
    assert _leftovers(tmp_path) == []  # neither login.jpg nor its .tmp
    assert transport.fetch(_url(HTML_KEY), tmp_path / "login.html", verify_image=False) == len(OBJECTS[HTML_KEY])


def test_a_named_profile_from_the_credentials_file_is_used(endpoint: str, aws_home: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (aws_home / ".aws" / "credentials").write_text(f"[animl]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    (aws_home / ".aws" / "config").write_text("[profile animl]\nregion = us-west-2\n")
    transport = _transport(endpoint, profile="animl")
    assert transport.client.meta.region_name == "us-west-2"
    assert transport.fetch(_url(SMALL_KEY), tmp_path / "small.jpg", verify_image=True) == len(OBJECTS[SMALL_KEY])
    monkeypatch.setenv("AWS_PROFILE", "animl")  # the same profile through the environment
    assert _transport(endpoint).size(_url(SMALL_KEY)) == len(OBJECTS[SMALL_KEY])


def test_unknown_profile_and_no_credentials_are_one_line_user_errors(endpoint: str, aws_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"^--aws-profile nobody: no such profile in .*config or .*credentials$"):
        _transport(endpoint, profile="nobody")
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(UserError, match="^AWS_PROFILE=nobody: no such profile"):
        _transport(endpoint)
    monkeypatch.delenv("AWS_PROFILE")
    with pytest.raises(UserError, match="^no AWS credentials for s3:// downloads: use --aws-profile NAME") as caught:
        _transport(endpoint)
    assert "\n" not in str(caught.value)


def test_anonymous_requests_read_public_objects_only(endpoint: str, aws_home: Path, tmp_path: Path) -> None:
    transport = _transport(endpoint, anonymous=True)  # no credentials anywhere, and none needed
    assert transport.fetch(_url(PUBLIC_KEY), tmp_path / "sample.jpg", verify_image=True) == len(OBJECTS[PUBLIC_KEY])
    assert (tmp_path / "sample.jpg").read_bytes() == OBJECTS[PUBLIC_KEY]
    with pytest.raises(FetchError, match=r"^access denied \(S3 AccessDenied\)$"):
        transport.fetch(_url(SMALL_KEY), tmp_path / "small.jpg", verify_image=True)
    assert _leftovers(tmp_path) == ["sample.jpg"]


def test_an_unreachable_server_is_a_network_error(aws_home: Path, env_credentials: None, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = _transport(f"http://127.0.0.1:{port}", retries=0)
    with pytest.raises(FetchError, match="^network error: Could not connect"):
        transport.fetch(_url(SMALL_KEY), tmp_path / "small.jpg", verify_image=True)
    assert transport.size(_url(SMALL_KEY)) is None


def test_no_message_names_a_credential(endpoint: str, env_credentials: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="classification")
    transport = _transport(endpoint)
    messages = []
    for url in (_url("images/nope.jpg"), "s3://no-such-bucket-here/a.jpg", _url(HTML_KEY)):
        with pytest.raises(FetchError) as caught:
            transport.fetch(url, tmp_path / "x.jpg", verify_image=True)
        messages.append(str(caught.value))
        transport.size(url)
    with Stubber(transport.client) as stub:  # a server that echoes the keys back in its message
        stub.add_client_error("get_object", "InvalidAccessKeyId", f"key {ACCESS_KEY} secret {SECRET_KEY} not valid", 403)
        with pytest.raises(FetchError) as caught:
            transport.fetch(_url(SMALL_KEY), tmp_path / "x.jpg", verify_image=True)
    assert str(caught.value) == "S3 InvalidAccessKeyId: key *** secret *** not valid"
    messages += [str(caught.value), caplog.text]
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert not any(secret in message for message in messages)


# --------------------------------------------------------------------------- stubbed responses


def _response(body: io.BytesIO, length: int) -> dict[str, object]:
    return {"Body": StreamingBody(body, length), "ContentLength": length, "ContentType": "image/jpeg"}


def test_errors_s3_answers_map_to_reasons(endpoint: str, env_credentials: None, tmp_path: Path) -> None:
    transport = _transport(endpoint)
    cases = [("AccessDenied", 403, "access denied (S3 AccessDenied)"), ("NoSuchKey", 404, "missing on the server (S3 NoSuchKey)"),
             ("SlowDown", 503, "S3 SlowDown: stubbed")]
    with Stubber(transport.client) as stub:
        for code, status, reason in cases:
            stub.add_client_error("get_object", code, "stubbed", status)
            with pytest.raises(FetchError) as caught:
                transport.fetch(_url(SMALL_KEY), tmp_path / "x.jpg", verify_image=True)
            assert str(caught.value) == reason
    assert _leftovers(tmp_path) == []


def test_a_body_cut_short_is_fetched_again(endpoint: str, env_credentials: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "BODY_RETRY_BACKOFF_SECONDS", 0.0)
    data = OBJECTS[SMALL_KEY]
    transport = _transport(endpoint, retries=1)
    with Stubber(transport.client) as stub:
        stub.add_response("get_object", _response(io.BytesIO(data[:100]), len(data)))
        stub.add_response("get_object", _response(io.BytesIO(data), len(data)))
        assert transport.fetch(_url(SMALL_KEY), tmp_path / "small.jpg", verify_image=True) == len(data)
        for _ in range(2):  # retries spent
            stub.add_response("get_object", _response(io.BytesIO(data[:100]), len(data)))
        with pytest.raises(FetchError, match=rf"^incomplete body: received 100 of {len(data)} bytes \(after 1 retry\)$"):
            transport.fetch(_url(SMALL_KEY), tmp_path / "again.jpg", verify_image=True)
    assert (tmp_path / "small.jpg").read_bytes() == data
    assert _leftovers(tmp_path) == ["small.jpg"]


class _StopsAfterFirstRead(io.BytesIO):
    """A body whose first read sets the run's stop event: Ctrl-C pressed mid-transfer."""

    def __init__(self, data: bytes, stop: threading.Event) -> None:
        super().__init__(data)
        self.stop = stop

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.stop.set()
        return chunk


def test_stop_cancels_a_transfer_and_leaves_no_file(endpoint: str, env_credentials: None, tmp_path: Path) -> None:
    transport = _transport(endpoint)
    data = OBJECTS[LARGE_KEY]
    assert len(data) > 2 * CHUNK_SIZE
    with Stubber(transport.client) as stub:
        stub.add_response("get_object", _response(_StopsAfterFirstRead(data, transport.stop), len(data)))
        with pytest.raises(Cancelled):
            transport.fetch(_url(LARGE_KEY), tmp_path / "large.jpg", verify_image=True)
    assert _leftovers(tmp_path) == []
    with pytest.raises(Cancelled):  # once stopped, nothing more is requested
        transport.fetch(_url(SMALL_KEY), tmp_path / "small.jpg", verify_image=True)
    assert _leftovers(tmp_path) == []


def test_an_animl_export_downloads_as_it_is_with_a_named_profile(endpoint: str, aws_home: Path, tmp_path: Path) -> None:
    """utils/download_images.py on an Animl export: serving_bucket_key in Animl's bucket, file_name locally, profile 'animl'."""
    (aws_home / ".aws" / "credentials").write_text(f"[animl]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    images = [{"id": "proj:1", "file_name": "proj/cam1/dep_a/proj-1.jpg", "serving_bucket_key": SMALL_KEY, "location": "dep a"},
              {"id": "proj:2", "file_name": "proj/cam1/dep_a/proj-2.jpg", "serving_bucket_key": LARGE_KEY, "location": "dep a"},
              {"id": "proj:3", "file_name": "proj/cam2/dep_b/proj-3.jpg", "serving_bucket_key": "original/gone-original.jpg"}]
    export = tmp_path / "animl_export.json"
    export.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    args = ["--coco-file", export, "--output-dir", tmp_path / "out", "--aws-profile", "animl", "--endpoint-url", endpoint, "--retries", "0"]
    result = run_entry_point("utils/download_images.py", *args)
    assert result.returncode == 1, result.stderr  # one key is missing: listed, the others downloaded
    assert (tmp_path / "out" / images[0]["file_name"]).read_bytes() == OBJECTS[SMALL_KEY]
    assert (tmp_path / "out" / images[1]["file_name"]).read_bytes() == OBJECTS[LARGE_KEY]
    assert "proj/cam2/dep_b/proj-3.jpg: missing on the server" in result.stdout
    again = run_entry_point("utils/download_images.py", *args)
    assert "2 skipped" in again.stdout
    for output in (result.stdout, result.stderr, again.stdout, again.stderr, (tmp_path / "out" / "download_failures.csv").read_text()):
        assert SECRET_KEY not in output and ACCESS_KEY not in output
    unknown = run_entry_point("utils/download_images.py", *args[:4], "--aws-profile", "nosuch", "--endpoint-url", endpoint)
    assert unknown.returncode == 2 and "--aws-profile nosuch: no such profile" in unknown.stderr and "Traceback" not in unknown.stderr
