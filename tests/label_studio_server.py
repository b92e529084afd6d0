"""A real Label Studio server for the tests, started once per test session on 127.0.0.1.

It serves local files from ``document_root``; each test puts its images in a sub-folder
of its own (Label Studio refuses a storage that is the document root itself). Skipped
with a clear reason where the server is not installed (``.ci/install_label_studio.sh``).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.processes import REPO_ROOT

LABEL_STUDIO_BIN = Path(os.environ.get("LABEL_STUDIO_BIN") or REPO_ROOT / ".venv-labelstudio" / "bin" / "label-studio")
START_TIMEOUT_S = float(os.environ.get("LABEL_STUDIO_START_TIMEOUT", "300"))


@dataclass
class LabelStudioServer:
    """A running server, its legacy API token, and the document root it serves local files from."""

    url: str
    token: str
    document_root: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll ``/health`` until the server answers; fail with the log's tail if it dies or takes too long."""
    import httpx  # noqa: PLC0415 - httpx is no declared dependency: only the real Label Studio tests need it

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"label-studio exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"label-studio not healthy after {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def label_studio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A fresh Label Studio on 127.0.0.1 serving local files from ``document_root`` (empty at the start)."""
    if not LABEL_STUDIO_BIN.is_file():
        pytest.skip(
            f"Label Studio server not installed at {LABEL_STUDIO_BIN} "
            "(run .ci/install_label_studio.sh or set LABEL_STUDIO_BIN)"
        )
    base = tmp_path_factory.mktemp("label_studio")
    document_root = base / "document_root"
    document_root.mkdir()
    port, token = free_port(), secrets.token_hex(20)
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
    }
    command = [
        str(LABEL_STUDIO_BIN),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--username",
        "u@example.com",
        "--password",
        secrets.token_hex(8),
        "--user-token",
        token,
        "--enable-legacy-api-token",
    ]
    log = base / "server.log"
    with open(log, "wb") as log_handle:
        process = subprocess.Popen(
            command, env=env, cwd=base, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, log)
        yield LabelStudioServer(url, token, document_root)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)




def annotate(server: LabelStudioServer, task_id: int, user_id: int, label: str | None) -> None:
    """POST an annotation as a person would: a single choice, or a cancelled (skipped) task."""
    import httpx  # noqa: PLC0415 - httpx is no declared dependency: only the real Label Studio tests need it

    result = (
        []
        if label is None
        else [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    )
    body = {"result": result, "was_cancelled": label is None, "completed_by": user_id}
    response = httpx.post(
        f"{server.url}/api/tasks/{task_id}/annotations/",
        json=body,
        headers={"Authorization": f"Token {server.token}"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
