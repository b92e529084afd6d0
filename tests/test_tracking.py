"""ExperimentTracker with the real comet_ml, offline and without network: the offline
archive, the fallback from a key that does not work, resume, metrics.csv, and the API key
never reaching a file or a log."""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from PIL import Image

from classification import redaction
from classification.active_learning.label_studio import load_label_studio_settings
from classification.active_learning.round_datasets import write_derived_config
from classification.active_learning.rounds import open_experiment
from classification.data.s3 import AwsOptions, S3Transport
from classification.errors import DataError, UserError
from classification.redaction import redact, redact_secrets
from classification.training.tracking import (
    ExperimentTracker,
    find_env_files,
    load_comet_settings,
    public_parameters,
)
from tests.helpers.training import build_dataset, run_train, write_run

FAKE_KEY = "x" * 32
CONFIG = {"learning_rate": 0.01, "data_root": Path("/data/demo"), "comet": "auto", "comet_project": None}


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(autouse=True)
def hermetic_comet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Comet settings from this machine; any online attempt hits a closed local port, once."""
    for name in ("COMET_API_KEY", "COMET_PROJECT_NAME", "COMET_WORKSPACE", "COMET_EXPERIMENT_KEY", "COMET_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.comet.config
    monkeypatch.setenv("COMET_URL_OVERRIDE", f"http://127.0.0.1:{closed_port()}/clientlib/")
    monkeypatch.setenv("COMET_HTTP_SESSION_RETRY_TOTAL", "0")
    monkeypatch.setenv("COMET_GET_OR_ADD_EXPERIMENT_RETRY_TOTAL", "0")
    monkeypatch.setenv("COMET_GET_OR_ADD_EXPERIMENT_RETRY_CONNECT", "0")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def archive_messages(path: Path) -> list[dict]:
    """The messages recorded in an offline archive."""
    with zipfile.ZipFile(path) as archive:
        return [json.loads(line) for line in archive.read("messages.json").decode().splitlines() if line.strip()]


def archive_info(path: Path) -> dict:
    """The experiment description in an offline archive."""
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("experiment.json"))


def logged_metrics(path: Path) -> dict[tuple[str, int], float]:
    """(metric name, epoch) -> value for every metric in an offline archive."""
    metrics = [m["payload"]["metric"] for m in archive_messages(path) if m["type"] == "metric_msg"]
    return {(m["metricName"], m["epoch"]): m["metricValue"] for m in metrics}


def logged_parameters(path: Path) -> dict[str, object]:
    """Parameter name -> value for every manually logged parameter in an offline archive."""
    params = [m["payload"]["param"] for m in archive_messages(path) if m["type"] == "parameter_msg"]
    return {p["paramName"]: p["paramValue"] for p in params if p["source"] == "manual"}


def read_csv(path: Path) -> list[dict[str, str]]:
    """metrics.csv as a list of rows."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def files_containing(folder: Path, text: str) -> list[str]:
    """Every file under ``folder`` (and every member of every zip) whose bytes contain ``text``."""
    found = []
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if text.encode() in path.read_bytes():
            found.append(str(path))
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                found += [f"{path}:{name}" for name in archive.namelist() if text.encode() in archive.read(name)]
    return found


def test_offline_archive_holds_what_was_logged(tmp_path: Path) -> None:
    (Path.cwd() / ".env").write_text("COMET_PROJECT_NAME=not-this-one\n")
    run_dir = tmp_path / "runs" / "resnet18" / "baseline"
    config = {**CONFIG, "comet_project": "camera-traps"}  # wins over COMET_PROJECT_NAME
    with ExperimentTracker.create(run_dir, config, "offline", "baseline", None) as tracker:
        assert tracker.mode == "offline" and tracker.key
        tracker.log_epoch(0, {"train_loss": 1.5, "val_top1": 0.25})
        tracker.log_epoch(1, {"train_loss": 1.0, "val_top1": 0.5, "val_ece": float("nan")})
        tracker.log_confusion_matrix([[3, 1], [0, 2]], ["agouti", "bird"], epoch=1)
        tracker.log_image(Image.new("RGB", (16, 16), "red"), "samples", epoch=1)
    archive = run_dir / "comet" / f"{tracker.key}.zip"
    assert [p.name for p in (run_dir / "comet").iterdir()] == [archive.name]
    assert archive_info(archive)["project_name"] == "camera-traps"

    metrics = logged_metrics(archive)
    assert metrics[("train_loss", 0)] == 1.5 and metrics[("val_top1", 0)] == 0.25
    assert metrics[("train_loss", 1)] == 1.0 and metrics[("val_top1", 1)] == 0.5
    assert ("val_ece", 1) not in metrics  # NaN goes to metrics.csv only
    assert logged_parameters(archive)["learning_rate"] == 0.01
    assert logged_parameters(archive)["data_root"] == "/data/demo"
    uploads = [m["payload"] for m in archive_messages(archive) if m["type"] == "file_upload"]
    assert {u["upload_type"] for u in uploads} == {"confusion-matrix", "visualization"}
    assert any(m["payload"].get("value") == "baseline" for m in archive_messages(archive) if m["type"] == "log_other")

    rows = read_csv(run_dir / "metrics.csv")
    assert list(rows[0]) == ["epoch", "train_loss", "val_ece", "val_top1"]
    assert [(r["epoch"], r["train_loss"], r["val_ece"]) for r in rows] == [("0", "1.5", ""), ("1", "1.0", "nan")]
    assert sorted(p.name for p in run_dir.iterdir()) == ["comet", "metrics.csv"]  # confusion matrix: Comet only


def test_auto_without_key_is_offline_and_reads_dotenv(tmp_path: Path) -> None:
    (Path.cwd() / ".env").write_text("COMET_PROJECT_NAME=camera-traps\nCOMET_WORKSPACE=lab\n")
    run_dir = tmp_path / "runs" / "exp"
    tracker = ExperimentTracker.create(run_dir, CONFIG, "auto", "exp", None)
    tracker.log_epoch(1, {"val_top1": 0.5})
    tracker.end()
    tracker.end()  # twice is harmless
    assert tracker.mode == "offline"
    info = archive_info(run_dir / "comet" / f"{tracker.key}.zip")
    assert (info["project_name"], info["workspace"]) == ("camera-traps", "lab")


def test_off_writes_only_metrics_csv(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracker = ExperimentTracker.create(run_dir, CONFIG, "off", "exp", "a" * 32)
    assert tracker.mode == "off"
    assert tracker.key == "a" * 32  # passed through: a later run with Comet on continues it
    tracker.log_parameters({"x": 1})
    tracker.log_epoch(1, {"val_loss": 0.75})
    tracker.log_confusion_matrix([[1]], ["a"], 1)
    tracker.log_image(Image.new("RGB", (4, 4)), "x", 1)
    tracker.end()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.csv"]
    assert read_csv(run_dir / "metrics.csv") == [{"epoch": "1", "val_loss": "0.75"}]


def test_disabled_tracker_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracker = ExperimentTracker.create(run_dir, CONFIG, "offline", "exp", "b" * 32, enabled=False)
    assert (tracker.mode, tracker.key) == ("off", "b" * 32)
    tracker.log_epoch(1, {"val_loss": 0.5})
    tracker.end()
    assert not run_dir.exists()


def test_online_without_key_and_unknown_mode_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no COMET_API_KEY") as error:
        ExperimentTracker.create(tmp_path / "run", CONFIG, "online", "exp", None)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="not one of"):
        ExperimentTracker.create(tmp_path / "run", CONFIG, "onlne", "exp", None)
    assert not (tmp_path / "run" / "comet").exists()


def test_wrong_key_falls_back_offline_and_key_is_never_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (Path.cwd() / ".env").write_text(f"COMET_API_KEY={FAKE_KEY}\n")
    run_dir = tmp_path / "runs" / "exp"
    config = {**CONFIG, "comet_api_key": FAKE_KEY, "notes": f"key is {FAKE_KEY}", "nested": {"API_KEY": FAKE_KEY}}
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="classification.training.tracking"):
        tracker = ExperimentTracker.create(run_dir, config, "auto", "exp", None)
    assert time.monotonic() - started < 10
    assert tracker.mode == "offline"
    warnings = [r.getMessage() for r in caplog.records if r.name == "classification.training.tracking"]
    assert len(warnings) == 1 and "offline archive" in warnings[0] and "\n" not in warnings[0]
    tracker.log_epoch(1, {"val_top1": 0.75})
    tracker.end()

    assert logged_metrics(run_dir / "comet" / f"{tracker.key}.zip")[("val_top1", 1)] == 0.75
    assert logged_parameters(run_dir / "comet" / f"{tracker.key}.zip")["learning_rate"] == 0.01
    assert files_containing(run_dir, FAKE_KEY) == []
    assert FAKE_KEY not in caplog.text


def test_resume_continues_the_same_experiment_without_duplicate_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    first = ExperimentTracker.create(run_dir, CONFIG, "offline", "exp", None)
    for epoch in (1, 2, 3):
        first.log_epoch(epoch, {"val_top1": epoch / 10})
    first.end()  # killed after epoch 3 was logged but before its checkpoint

    second = ExperimentTracker.create(run_dir, CONFIG, "offline", "exp", first.key)
    assert second.key == first.key
    second.log_epoch(3, {"val_top1": 0.35})  # repeated from the epoch-2 checkpoint
    second.log_epoch(3, {"train_loss": 0.9})  # a second call for the same epoch adds to its row
    second.log_epoch(4, {"val_top1": 0.4})
    second.end()
    rows = read_csv(run_dir / "metrics.csv")
    assert [(r["epoch"], r["val_top1"], r["train_loss"]) for r in rows] == [
        ("1", "0.1", ""),
        ("2", "0.2", ""),
        ("3", "0.35", "0.9"),
        ("4", "0.4", ""),
    ]
    archives = sorted((run_dir / "comet").iterdir())
    continuation = [a for a in archives if a.name != f"{first.key}.zip"]
    assert len(archives) == 2 and continuation[0].name.startswith(f"{first.key}-")
    assert archive_info(continuation[0])["offline_id"] == first.key
    assert logged_metrics(continuation[0]) == {("val_top1", 3): 0.35, ("train_loss", 3): 0.9, ("val_top1", 4): 0.4}

    # Resumed from an earlier checkpoint (e.g. best.pt at epoch 2): later rows are dropped,
    # and a key that does not work online still continues the same experiment offline.
    monkeypatch.setenv("COMET_API_KEY", FAKE_KEY)
    third = ExperimentTracker.create(run_dir, CONFIG, "online", "exp", first.key)
    assert (third.mode, third.key) == ("offline", first.key)
    third.log_epoch(2, {"val_top1": 0.25})
    third.end()
    assert [(r["epoch"], r["val_top1"]) for r in read_csv(run_dir / "metrics.csv")] == [("1", "0.1"), ("2", "0.25")]
    assert len(list((run_dir / "comet").iterdir())) == 3
    assert files_containing(run_dir, FAKE_KEY) == []


def test_invalid_existing_key_starts_a_new_offline_experiment(tmp_path: Path) -> None:
    tracker = ExperimentTracker.create(tmp_path / "run", CONFIG, "offline", "exp", "not-a-key")
    tracker.end()
    assert tracker.key != "not-a-key" and (tmp_path / "run" / "comet" / f"{tracker.key}.zip").is_file()


def test_public_parameters_drop_secrets() -> None:
    parameters = {
        "learning_rate": 0.1,
        "COMET_API_KEY": "k" * 32,
        "access_token": "t",
        "nested": {"apikey": "z", "path": Path("/a/b"), "list": [Path("/c"), 1]},
        "copied": "prefix-" + "s" * 32,
    }
    assert public_parameters(parameters, secrets=["s" * 32, ""]) == {
        "learning_rate": 0.1,
        "nested": {"path": "/a/b", "list": ["/c", 1]},
    }


def test_env_files_nearest_first_up_to_the_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    run_dir = project / "runs" / "model" / "exp"
    run_dir.mkdir(parents=True)
    (project / ".git").mkdir()
    (project / ".env").write_text("COMET_API_KEY=from-project\nCOMET_WORKSPACE=lab\n")
    (run_dir / ".env").write_text("COMET_API_KEY=from-run\n")
    (tmp_path / ".env").write_text("COMET_PROJECT_NAME=outside-the-project\n")
    assert find_env_files(run_dir) == [run_dir / ".env", project / ".env"]
    settings = load_comet_settings(run_dir)
    assert (settings.api_key, settings.workspace, settings.project_name) == ("from-run", "lab", None)
    assert "from-run" not in repr(settings)
    monkeypatch.setenv("COMET_API_KEY", "from-environment")
    assert load_comet_settings(run_dir).api_key == "from-environment"


def test_metrics_csv_rejects_a_file_without_epochs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("loss\n1.0\n")
    with pytest.raises(UserError, match="metrics.csv: no 'epoch' column"):
        ExperimentTracker.create(run_dir, CONFIG, "off", "exp", None)


def test_key_like_environment_values_are_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_ACCESS_TOKEN", "t0k3n-value-123")
    monkeypatch.setenv("SHORT_KEY", "1")  # too short to be a secret: would drop every "1"
    secrets = ExperimentTracker(None).secrets
    assert "t0k3n-value-123" in secrets and "1" not in secrets
    assert public_parameters({"a": "t0k3n-value-123", "b": 1}, secrets) == {"b": 1}


# ---------------------------------------------------------------- secrets: refused when malformed, redacted everywhere


@pytest.fixture(autouse=True)
def no_registered_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets registered by earlier tests in this process (``.env`` files read) are forgotten."""
    monkeypatch.setattr(redaction, "_registered", set())


COMET_KEY = "Zq9aBcDeFgHiJkLmNoPqRsTuV"  # what a Comet key looks like: 25 letters and digits
ESCAPED_KEY = "Zq9aBcDeFgHiJkLm\\nkeyMoreSecret42"  # as a quoted .env value shows it; python-dotenv reads a newline


def forms_of(secret: str) -> list[str]:
    """Every way a test looks for a secret: as is, escaped, repr'd, each of its lines."""
    lines = [line for line in secret.splitlines() if line]
    return sorted({secret, secret.encode("unicode_escape").decode(), repr(secret), json.dumps(secret)[1:-1], *lines})


def leaks(folder: Path, outputs: Sequence[str], secrets: Sequence[str], skip: Sequence[str] = (".env",)) -> list[str]:
    """Where any form of any secret shows: the outputs, every file under ``folder`` (zip members and the contents
    of torch.load'ed checkpoints included), except the files named in ``skip`` (where the user put it)."""
    found = [f"output {i}" for i, text in enumerate(outputs) for s in secrets for form in forms_of(s) if form in text]
    for path in folder.rglob("*"):
        if not path.is_file() or path.name in skip:
            continue
        texts = [path.read_bytes().decode("latin-1")]
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                texts += [archive.read(name).decode("latin-1") for name in archive.namelist()]
        if path.suffix == ".pt":
            texts.append(repr(torch.load(path, map_location="cpu", weights_only=False)))
        found += [str(path) for text in texts for s in secrets for form in forms_of(s) if form in text]
    return sorted(set(found))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cropped and split dataset for end-to-end runs of classifier/train.py."""
    return build_dataset(tmp_path_factory.mktemp("secrets"), n_locations=4, sequences=2, frames=2)


def comet_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a train.py run whose Comet online attempt hits a closed local port at once."""
    return {"HOME": str(tmp_path / "home"), "COMET_URL_OVERRIDE": f"http://127.0.0.1:{closed_port()}/clientlib/",
            "COMET_HTTP_SESSION_RETRY_TOTAL": "0", "COMET_GET_OR_ADD_EXPERIMENT_RETRY_TOTAL": "0", **extra}


def test_a_key_that_is_not_a_plain_token_is_one_line_before_comet_sees_it(dataset: Path, tmp_path: Path) -> None:
    config = write_run(tmp_path / "run", dataset, num_epochs=1, comet="auto")
    (config.parent / ".env").write_text(f'COMET_API_KEY="{ESCAPED_KEY}"\n')
    done = run_train(config, **comet_env(tmp_path))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: COMET_API_KEY in {config.parent / '.env'}: not a valid key (expected letters, digits, "
                     "'-' or '_', on one line, without quotes or spaces); nothing was sent"], done.stderr[-3000:]
    secret = ESCAPED_KEY.replace("\\n", "\n")
    assert leaks(config.parent, [done.stdout, done.stderr], [secret]) == []
    assert sorted(p.name for p in config.parent.iterdir()) == [".env", "config.yml"]  # stopped before anything was written


@pytest.mark.parametrize("value", ["has space in it 12345", "line-one-1234\nline-two-5678", "'quoted-key-12345'", "short"])
def test_a_comet_key_in_the_environment_that_is_not_a_plain_token_is_refused(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMET_API_KEY", value)
    with pytest.raises(DataError, match="^COMET_API_KEY in the environment: not a valid key") as error:
        ExperimentTracker.create(tmp_path / "run", CONFIG, "auto", "exp", None)
    assert not any(form in str(error.value) for form in forms_of(value) if len(form) > 4)
    assert not (tmp_path / "run").exists()


def test_redact_replaces_every_form_of_a_secret() -> None:
    secret = 'Zq9aBcDeFgHi\nkey"More\\Secret42'
    shown = [secret, repr(secret), json.dumps(secret), str([secret]), secret.encode("unicode_escape").decode(),
             "prefix " + secret.splitlines()[1] + " suffix", quote(secret, safe="")]
    for text in shown:
        assert leaks_in(redact(text, [secret]), secret) == [], text
    assert redact("lr 0.1", [secret]) == "lr 0.1"
    assert redact_secrets({"a": [secret, 1], secret: (2, f"x{secret}")}, [secret]) == {"a": ["***", 1], "***": (2, "x***")}


def leaks_in(text: str, secret: str) -> list[str]:
    """The forms of ``secret`` still in ``text``."""
    return [form for form in forms_of(secret) if form in text]


def test_a_secret_passed_by_set_is_written_nowhere(dataset: Path, tmp_path: Path) -> None:
    aws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    config = write_run(tmp_path / "run", dataset, num_epochs=1, comet="auto")
    (config.parent / ".env").write_text(f"COMET_API_KEY={COMET_KEY}\n")
    done = run_train(config, "--set", f"experiment_name={COMET_KEY}", "--set", f"comet_project={aws_secret}",
                     **comet_env(tmp_path, AWS_SECRET_ACCESS_KEY=aws_secret))
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "hold a secret" in line]
    assert warnings == ["comet_project, experiment_name hold a secret (an API key or token): written as *** in the "
                        "run files, checkpoints and Comet"], done.stderr[-3000:]
    run_dir = config.parent
    assert [p.name for p in (run_dir / "comet").glob("*.zip")] and (run_dir / "checkpoints" / "last.pt").is_file()
    assert leaks(run_dir, [done.stdout, done.stderr], [COMET_KEY, aws_secret]) == []
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["overrides"] == ["experiment_name=***", "comet_project=***"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert (checkpoint["config"]["experiment_name"], checkpoint["config"]["learning_rate"]) == ("***", 0.05)


def test_a_label_studio_key_that_is_not_a_plain_token_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    env_file = tmp_path / ".env"
    env_file.write_text(f'LABEL_STUDIO_API_KEY="{ESCAPED_KEY}"\n')
    with pytest.raises(DataError, match=f"^LABEL_STUDIO_API_KEY in {env_file}: not a valid key") as error:
        load_label_studio_settings(env_file)
    assert leaks_in(str(error.value), ESCAPED_KEY.replace("\\n", "\n")) == []
    token = "0123456789abcdef0123456789abcdef01234567"  # a legacy token: 40 hex characters
    env_file.write_text(f"LABEL_STUDIO_API_KEY={token}\n")
    assert load_label_studio_settings(env_file).api_key == token
    assert token in redaction.known_secrets()  # so no run file or checkpoint can hold it


def test_a_fifo_as_label_studio_env_file_is_one_line(tmp_path: Path) -> None:
    fifo = tmp_path / ".env"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="is a FIFO"):
        load_label_studio_settings(fifo)  # before: dotenv_values waited for a writer forever


def test_aws_credentials_from_a_profile_are_known_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPROFILEKEY"
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[lab]\naws_access_key_id = AKIAPROFILEEXAMPLE01\naws_secret_access_key = {secret}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    S3Transport(AwsOptions(profile="lab", region="us-east-1"), retries=0, timeout=1.0, stop=threading.Event())
    assert {secret, "AKIAPROFILEEXAMPLE01"} <= set(redaction.known_secrets())


def test_an_active_learning_round_config_holds_no_key_given_by_set(dataset: Path, tmp_path: Path) -> None:
    config = write_run(tmp_path / "run", dataset, comet="offline")
    (config.parent / ".env").write_text(f"COMET_API_KEY={COMET_KEY}\n")
    experiment = open_experiment(config, [f"comet_project={COMET_KEY}"])
    derived = write_derived_config(experiment, tmp_path / "round", dataset, "round 1")
    assert derived.comet_project == "***" and COMET_KEY not in (tmp_path / "round" / "config.yml").read_text()
