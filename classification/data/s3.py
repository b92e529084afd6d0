"""S3 for downloads: ``s3://bucket/key`` objects fetched with boto3, bodies checked against their length.

Animl's exports name each image by its key in Animl's serving bucket (``serving_bucket_key``), which
is private: ``download`` turns those keys into ``s3://`` URLs and fetches them through ``S3Transport``,
as it fetches ``http(s)://`` URLs through ``classification.data.http.Http``, with the same rules (atomic
writes, a size check, an image check, failures as one-line reasons). Credentials come only from a named
profile (``~/.aws/config``, ``~/.aws/credentials``) or the environment (boto3's default chain), never
from a flag, so that no key lands in shell history, a process list or a log; no message here names one.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    IncompleteReadError,
    InvalidRegionError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from urllib3.exceptions import ProtocolError

from classification.data.http import CHUNK_SIZE, MAX_BACKOFF_SECONDS, Cancelled, FetchError, _after, _BodyError, check_image_body
from classification.errors import UserError
from classification.io import atomic_open
from classification.redaction import register_secret

log = logging.getLogger(__name__)

ANIML_SERVING_BUCKET = "animl-images-serving-prod"  # Animl's serving bucket (animl-analytics' download script)
ANIML_REGION = "us-west-2"
MAX_POOL_CONNECTIONS = 32  # one per download thread, up to this many, without "connection pool is full" warnings
BODY_RETRY_BACKOFF_SECONDS = 0.5  # the wait before fetching a body cut short again; doubles each time, at most 60 s
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden"})
NO_CREDENTIALS = ("no AWS credentials for s3:// downloads: use --aws-profile NAME, set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,"
                  " or --no-sign-request for a public bucket")
BODY_ERRORS = (ResponseStreamingError, ReadTimeoutError, ConnectionClosedError, ProtocolError)


@dataclass(frozen=True)
class AwsOptions:
    """How to reach S3: the profile (else ``AWS_PROFILE``, else boto3's default chain), region, endpoint, signing."""

    profile: str | None = None  # a named profile from ~/.aws/config / credentials (AWS_PROFILE otherwise, then boto3's default chain)
    region: str | None = None  # default: the profile's (or AWS_REGION's) region, else us-west-2
    endpoint_url: str | None = None  # an S3-compatible server (MinIO, moto, a mirror); AWS_ENDPOINT_URL also works through boto3
    anonymous: bool = False  # unsigned requests, for public buckets


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b.jpg`` -> ``("bucket", "a/b.jpg")``; the key is taken as it is (S3 keys are not URL-quoted)."""
    if url[:5].lower() != "s3://":
        raise ValueError(f"{url!r}: not an s3:// URL (expected s3://BUCKET/KEY)")
    bucket, _, key = url[5:].partition("/")
    if not bucket or not key:
        raise ValueError(f"{url!r}: expected s3://BUCKET/KEY, with a bucket and a key")
    if key.endswith("/"):
        raise ValueError(f"{url!r}: names a folder (a key ending in /), not an object")
    return bucket, key


def s3_url(bucket: str, key: str) -> str:
    """The ``s3://`` URL of ``key`` in ``bucket`` (the inverse of ``split_s3_url``)."""
    return f"s3://{bucket}/{key}"


class S3Transport:
    """GetObject/HeadObject for ``download``: one boto3 client (thread-safe) shared by every download thread."""

    def __init__(self, options: AwsOptions, retries: int, timeout: float, stop: threading.Event) -> None:
        self.options = options
        self.retries = retries
        self.stop = stop
        session, region = _open_session(options)
        self._secrets = () if options.anonymous else _credential_values(session, options.profile)
        for secret in self._secrets:  # known to every writer of run provenance (redaction.known_secrets)
            register_secret(secret)
        self.client: Any = _make_client(session, options, region, retries, timeout)

    def size(self, url: str) -> int | None:
        """The object's size from HeadObject, or None when unknown (any error: missing, denied, unreachable)."""
        try:
            bucket, key = split_s3_url(url)
            return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except (ValueError, KeyError, TypeError, BotoCoreError, ClientError) as error:
            log.debug("%s: size unknown (%s)", url, self._redact(str(error)))
            return None

    def fetch(self, url: str, destination: Path, verify_image: bool) -> int:
        """GetObject ``url`` into ``destination`` atomically, a body cut short fetched again; returns the bytes written."""
        try:
            bucket, key = split_s3_url(url)
        except ValueError as error:
            raise FetchError(str(error)) from None
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                raise Cancelled()
            try:
                return self._fetch_once(bucket, key, destination, verify_image)
            except _BodyError as error:
                if attempt == self.retries:
                    raise FetchError(self._redact(f"{error}{_after(self.retries)}")) from None
                log.debug("retrying %s: %s", url, error)
                if self.stop.wait(min(BODY_RETRY_BACKOFF_SECONDS * 2**attempt, MAX_BACKOFF_SECONDS)):
                    raise Cancelled() from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        """Close the client's connection pool."""
        self.client.close()

    def _fetch_once(self, bucket: str, key: str, destination: Path, verify_image: bool) -> int:
        """One GetObject into ``destination`` (atomically); ``verify_image``: the body must decode before it is kept."""
        response = self._get(bucket, key)
        try:
            with atomic_open(destination, "w+b") as handle:
                received = self._receive(response, handle)
                if verify_image:
                    check_image_body(handle, received, response.get("ContentType"))
        finally:
            response["Body"].close()
        return received

    def _get(self, bucket: str, key: str) -> dict[str, Any]:
        """GetObject's response (botocore has retried what is transient); an error is a ``FetchError`` with its reason."""
        try:
            response: dict[str, Any] = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            raise FetchError(self._redact(_client_error_reason(error, bucket))) from None
        except (BotoConnectionError, HTTPClientError) as error:  # connection refused, DNS, TLS, timeouts: retries spent
            raise FetchError(self._redact(f"network error: {error}{_after(self.retries)}")) from None
        except BotoCoreError as error:  # a bucket name botocore refuses, credentials that stopped working, ...
            raise FetchError(self._redact(f"S3 request failed: {error}")) from None
        return response

    def _receive(self, response: dict[str, Any], handle: IO[bytes]) -> int:
        """Stream the body into ``handle``; returns the bytes written. A body that is not ``ContentLength`` long,
        or a connection dropped while reading it, is a ``_BodyError`` (worth another GetObject)."""
        expected = response.get("ContentLength")
        received = 0
        try:
            for chunk in response["Body"].iter_chunks(CHUNK_SIZE):
                if self.stop.is_set():
                    raise Cancelled()
                handle.write(chunk)
                received += len(chunk)
        except IncompleteReadError as error:  # botocore's own check of ContentLength, at the end of the stream
            raise _BodyError(f"incomplete body: received {received} of {error.kwargs['expected_bytes']} bytes") from None
        except BODY_ERRORS as error:
            raise _BodyError(f"network error while reading: {error}") from None
        if expected is not None and received < expected:
            raise _BodyError(f"incomplete body: received {received} of {expected} bytes")
        if expected is not None and received > expected:
            raise _BodyError(f"body longer than ContentLength {expected}")
        return received

    def _redact(self, text: str) -> str:
        """``text`` with every credential value (access key id, secret, session token) replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _open_session(options: AwsOptions) -> tuple[Any, str]:
    """A boto3 session for the profile and the region to use; an unknown profile is a one-line ``UserError``."""
    try:
        session = boto3.Session(profile_name=options.profile)
        return session, options.region or session.region_name or ANIML_REGION
    except ProfileNotFound as error:
        raise UserError(_profile_not_found(options.profile, error)) from None


def _profile_not_found(profile: str | None, error: ProfileNotFound) -> str:
    """The message for a profile that is in neither AWS file, naming where it came from (the flag or AWS_PROFILE)."""
    name = error.kwargs.get("profile", profile)
    where = f"--aws-profile {name}" if profile is not None else f"AWS_PROFILE={name}"
    config = os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")
    credentials = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    return f"{where}: no such profile in {config} or {credentials}"


def _credential_values(session: Any, profile: str | None) -> tuple[str, ...]:
    """The credential values to keep out of every message; none at all is a one-line ``UserError`` before any download."""
    try:
        credentials = session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
    except ProfileNotFound as error:
        raise UserError(_profile_not_found(profile, error)) from None
    except BotoCoreError as error:  # partial keys in the environment, a credential_process or SSO login that failed
        raise UserError(f"cannot load AWS credentials for s3:// downloads: {error}") from None
    if frozen is None or not frozen.access_key:
        if profile is not None:
            raise UserError(f"--aws-profile {profile}: the profile has no credentials (keys, role_arn, sso_session or credential_process)")
        raise UserError(NO_CREDENTIALS)
    return tuple(value for value in (frozen.access_key, frozen.secret_key, frozen.token) if value)


def _make_client(session: Any, options: AwsOptions, region: str, retries: int, timeout: float) -> Any:
    """The S3 client: botocore's standard retries (``retries`` after the first attempt), timeouts, a pool per thread."""
    config = Config(retries={"max_attempts": retries + 1, "mode": "standard"}, connect_timeout=timeout, read_timeout=timeout,
                    max_pool_connections=MAX_POOL_CONNECTIONS, signature_version=UNSIGNED if options.anonymous else None)
    try:
        return session.client("s3", region_name=region, endpoint_url=options.endpoint_url, config=config)
    except InvalidRegionError:
        raise UserError(f"AWS region {region!r}: not a region name (e.g. {ANIML_REGION})") from None
    except ValueError as error:  # botocore's "Invalid endpoint: ..."
        raise UserError(f"S3 endpoint {options.endpoint_url!r}: not a URL (e.g. http://127.0.0.1:9000): {error}") from None


def _client_error_reason(error: ClientError, bucket: str) -> str:
    """A failure reason for an error S3 answered: missing, denied, no bucket, or its code and message."""
    details = error.response.get("Error", {})
    code = str(details.get("Code") or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "error"))
    if code in MISSING_CODES:
        return "missing on the server (S3 NoSuchKey)"
    if code in DENIED_CODES:
        return "access denied (S3 AccessDenied)"
    if code == "NoSuchBucket":
        return f"no such bucket: {bucket}"
    message = details.get("Message")
    retried = int(error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
    return f"S3 {code}: {message}{_after(retried)}" if message else f"S3 {code}{_after(retried)}"
