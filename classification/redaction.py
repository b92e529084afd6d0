"""Secrets: which values are secret, where they are read from, and keeping them out of everything a run writes.

A secret is the Comet API key, the Label Studio API key, or an AWS credential (``SECRET_NAMES``),
from the environment or a ``.env`` file, plus any environment value named like a key, token or
password, plus what a reader registers (``register_secret``: e.g. credentials boto3 found in
``~/.aws``). ``read_env_file`` checks each named secret it reads is a plain token: a quoted value
with an escaped newline or a space is refused in one line before any library sees it (comet_ml
put such a key into its warnings and a traceback). ``redact`` replaces every form a secret can be
shown in (as is, escaped as by ``repr`` or JSON, URL-quoted, each of its lines); ``redact_secrets``
does that to every string of a config, ``run_info.json`` or checkpoint before it is written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dotenv import dotenv_values

from classification.errors import DataError
from classification.io import read_bounded_text, unreadable_file

log = logging.getLogger(__name__)

MASK = "***"
# The secrets this project reads by name, and what a plain token of each looks like: Comet keys are
# alphanumeric (25 characters); Label Studio keys are 40 hex characters or a JWT (dots); AWS's come from boto3.
PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{8,256}")
JWT_TOKEN = re.compile(r"[A-Za-z0-9._-]{8,8192}")
AWS_TOKEN = re.compile(r"[A-Za-z0-9/+=._-]{8,8192}")
SECRET_NAMES: dict[str, re.Pattern[str]] = {
    "COMET_API_KEY": PLAIN_TOKEN,
    "LABEL_STUDIO_API_KEY": JWT_TOKEN,
    "AWS_ACCESS_KEY_ID": AWS_TOKEN,
    "AWS_SECRET_ACCESS_KEY": AWS_TOKEN,
    "AWS_SESSION_TOKEN": AWS_TOKEN,
}
SECRET_NAME_PARTS = ("api_key", "apikey", "secret", "password", "token")
MIN_SECRET_LENGTH = 8  # shorter key-like environment values (``KEY=1``) are settings, not secrets
MIN_LINE_LENGTH = 4  # each line of a multi-line secret is redacted when at least this long

_registered: set[str] = set()


def is_secret_name(name: str) -> bool:
    """True for a setting named like a key, token or password (``COMET_API_KEY``, ``comet_api_key``, ``DB_PASSWORD``)."""
    lowered = name.lower()
    return name.upper() in SECRET_NAMES or any(part in lowered for part in (*SECRET_NAME_PARTS, "key"))


def check_token(name: str, value: str, where: str) -> str:
    """``value`` when it is a plain token for ``name``; else a one-line ``DataError`` that never shows it."""
    pattern = SECRET_NAMES.get(name, JWT_TOKEN)
    if not pattern.fullmatch(value):
        raise DataError(f"{name} in {where}: not a valid key (expected letters, digits, '-' or '_', "
                        "on one line, without quotes or spaces); nothing was sent")
    return value


def register_secret(value: str | None) -> None:
    """Remember a secret found at run time (a key given as an argument, credentials from ``~/.aws``)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _registered.add(value)


def find_env_files(run_dir: Path) -> list[Path]:
    """``.env`` files that may hold a run's settings, nearest first: the run folder, its parents up to the project
    root (the first folder with ``.git``) or the current folder, then the current folder."""
    run_dir = Path(run_dir).resolve()
    cwd = Path.cwd().resolve()
    chain = [run_dir, *run_dir.parents]
    stop = next((i for i, folder in enumerate(chain) if folder == cwd or (folder / ".git").exists()), 0)
    folders = [*chain[: stop + 1], cwd]
    files = [folder / ".env" for folder in dict.fromkeys(folders)]
    return [path for path in files if path.is_file()]


def read_env_file(path: Path, checked: Iterable[str] = ()) -> dict[str, str | None]:
    """The settings of a ``.env`` file, every secret in it registered and those named in ``checked`` (the ones the
    caller will use) checked (``check_token``); one that cannot be read is a one-line ``DataError`` (its contents,
    which may hold a key, are never shown)."""
    try:
        values = dict(dotenv_values(stream=io.StringIO(read_bounded_text(path, "a .env file"))))
    except (OSError, UnicodeDecodeError) as error:
        raise unreadable_file(path, error, "a .env file") from None
    for name, value in values.items():
        if value and is_secret_name(name):
            register_secret(value)
    for name in checked:
        if values.get(name):
            check_token(name, str(values[name]), str(path))
    return values


def environment_secrets() -> tuple[str, ...]:
    """Values of environment variables named like a key, token or password (8+ characters)."""
    return tuple(value for name, value in os.environ.items() if len(value) >= MIN_SECRET_LENGTH and is_secret_name(name))


def known_secrets(*env_files: Path) -> tuple[str, ...]:
    """Every secret this process knows: the environment's, those of ``env_files`` (read now) and those registered."""
    for path in env_files:
        read_env_file(path)
    return tuple(dict.fromkeys((*environment_secrets(), *sorted(_registered))))


def secret_forms(secret: str) -> list[str]:
    """The ways ``secret`` can appear in text: as is, escaped (``repr``, JSON, ``unicode_escape``), URL-quoted, each line."""
    forms = [secret, repr(secret)[1:-1], json.dumps(secret)[1:-1], secret.encode("unicode_escape").decode("ascii"),
             quote(secret, safe="")]
    forms += [line.strip() for line in secret.splitlines() if len(line.strip()) >= MIN_LINE_LENGTH]
    return sorted({form for form in forms if form}, key=len, reverse=True)  # longest first: no half-redacted form


def holds_secret(text: str, secrets: Iterable[str]) -> bool:
    """True when ``text`` contains any form of any of ``secrets``."""
    return any(form in text for secret in secrets if secret for form in secret_forms(secret))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every form of every secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            for form in secret_forms(secret):
                text = text.replace(form, MASK)
    return text


def redact_secrets(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` (a config, ``run_info``, a checkpoint's plain parts) with every string that holds a secret redacted;
    mappings, lists and tuples are copied, everything else (tensors, numbers) is kept as it is."""
    secrets = tuple(secret for secret in secrets if secret)
    if not secrets:
        return value
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, Mapping):
        return {redact_secrets(key, secrets): redact_secrets(item, secrets) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(item, secrets) for item in value)
    return value


def fields_holding_secrets(values: Mapping[str, Any], secrets: Iterable[str], prefix: str = "") -> list[str]:
    """The dotted names of the fields of ``values`` whose value holds a secret (for a warning without the value)."""
    secrets = tuple(secrets)
    found: list[str] = []
    for name, value in values.items():
        if isinstance(value, Mapping):
            found += fields_holding_secrets(value, secrets, f"{prefix}{name}.")
        elif holds_secret(str(value), secrets):
            found.append(f"{prefix}{name}")
    return found


def warn_about_secrets(values: Mapping[str, Any], secrets: Iterable[str], where: str) -> None:
    """One warning line naming the fields that hold a secret (never the value) and where they are written as ``***``."""
    fields = fields_holding_secrets(values, secrets)
    if fields:
        log.warning("%s hold%s a secret (an API key or token): written as %s in %s", ", ".join(fields),
                    "s" if len(fields) == 1 else "", MASK, where)
