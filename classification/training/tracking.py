"""Experiment tracking: Comet online, offline or off, and always a local ``metrics.csv``.

Modes (the config's ``comet`` key):
- ``auto``: online when a ``COMET_API_KEY`` is found, else an offline archive;
- ``online``: online; no key is a one-line ``UserError``;
- ``offline``: an offline archive ``<run_dir>/comet/<key>.zip`` (``comet upload`` it later);
- ``off``: no Comet at all.
``COMET_API_KEY``, ``COMET_PROJECT_NAME`` and ``COMET_WORKSPACE`` come from the environment,
else from the nearest ``.env`` file (python-dotenv): the experiment folder, its parents up
to the project root (the first folder with ``.git``) or the current folder, then the
current folder. The config's ``comet_project`` wins over ``COMET_PROJECT_NAME``.

A key that does not work or a server that cannot be reached never loses data: Comet's
``Experiment`` then comes back with ``alive == False`` (it has dropped everything and will
log nothing); the tracker sees that (or any exception while starting), warns in one line
and logs to the offline archive instead. Once an online experiment is running, Comet's own
fallback streamer writes an archive to ``<run_dir>/comet`` if the connection is lost.

Resume: ``existing_key`` (stored in the checkpoint) continues the same experiment:
online with ``ExistingExperiment``; offline with ``ExistingOfflineExperiment``, which
writes a further archive ``<run_dir>/comet/<key>-<random>.zip`` holding only what the
resumed run logs. ``comet upload`` the archives oldest first (``<key>.zip`` first): the
first creates the experiment, the later ones append to it. In ``off`` mode the key is
passed through unchanged so a later run with Comet on still continues it.

The API key is only ever handed to ``comet_ml``: it is never logged as a parameter,
printed, or written to the experiment folder.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from classification.errors import DataError, UserError
from classification.io import atomic_open, unreadable_file
from classification.redaction import (
    SECRET_NAME_PARTS,
    check_token,
    find_env_files,
    holds_secret,
    known_secrets,
    read_env_file,
    redact,
    register_secret,
)

log = logging.getLogger(__name__)

TrackingMode = Literal["auto", "online", "offline", "off"]
MODES: tuple[str, ...] = ("auto", "online", "offline", "off")
COMET_DIR = "comet"
METRICS_FILE = "metrics.csv"
SETTING_NAMES = ("COMET_API_KEY", "COMET_PROJECT_NAME", "COMET_WORKSPACE")

# Nothing Comet logs by itself: no code, git, environment, host, packages or console output,
# so it never probes the network or cloud-metadata addresses and only logs what we log.
QUIET_COMET_ENVIRONMENT = {
    "COMET_AUTO_LOG_ENV_DETAILS": "false",
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "COMET_DISABLE_AUTO_LOGGING": "1",
}
EXPERIMENT_OPTIONS: dict[str, Any] = {
    "log_code": False,
    "log_graph": False,
    "auto_param_logging": False,
    "auto_metric_logging": False,
    "parse_args": False,
    "auto_output_logging": False,
    "log_env_details": False,
    "log_env_gpu": False,
    "log_env_host": False,
    "log_env_cpu": False,
    "log_env_disk": False,
    "log_git_metadata": False,
    "log_git_patch": False,
    "display_summary_level": 0,
}
# Accepted by Experiment/ExistingExperiment/OfflineExperiment but not ExistingOfflineExperiment.
EXTRA_OPTIONS: dict[str, Any] = {"log_env_network": False, "auto_log_co2": False}


@dataclass(frozen=True)
class CometSettings:
    """Comet settings found in the environment or a ``.env`` file (the key is never shown)."""

    api_key: str | None = field(default=None, repr=False)
    project_name: str | None = None
    workspace: str | None = None


def load_comet_settings(run_dir: Path) -> CometSettings:
    """Each setting from the environment, else from the nearest ``.env`` that sets it; a key that is not a plain
    token is a one-line ``DataError`` (``check_token``) before comet_ml ever sees it."""
    sources: list[tuple[str, Mapping[str, str | None]]] = [("the environment", os.environ)]
    sources += [(str(path), read_env_file(path, ("COMET_API_KEY",))) for path in find_env_files(run_dir)]
    found: dict[str, str | None] = {}
    for name in SETTING_NAMES:
        found[name] = next((source[name] for _, source in sources if source.get(name)), None)
    key_from = next((where for where, source in sources if source.get("COMET_API_KEY")), None)
    if found["COMET_API_KEY"] and key_from:
        register_secret(found["COMET_API_KEY"])
        check_token("COMET_API_KEY", found["COMET_API_KEY"], key_from)
    return CometSettings(found["COMET_API_KEY"], found["COMET_PROJECT_NAME"], found["COMET_WORKSPACE"])


class ExperimentTracker:
    """Logs parameters, per-epoch metrics, confusion matrices and images to Comet (if any)
    and per-epoch metrics to ``<run_dir>/metrics.csv`` (always, unless disabled)."""

    def __init__(self, run_dir: Path | None, key: str | None = None) -> None:
        """A tracker without Comet (mode "off"); ``run_dir=None`` writes nothing at all."""
        self.run_dir = run_dir
        self.mode = "off"
        self._experiment: Any | None = None
        self._key = key
        self._secrets: tuple[str, ...] = ()
        self._rows: dict[int, dict[str, str]] = read_metrics_csv(self.metrics_path) if self.metrics_path else {}
        self._epochs_logged: set[int] = set()

    @classmethod
    def create(
        cls,
        run_dir: Path,
        config_dict: Mapping[str, Any],
        mode: str = "auto",
        experiment_name: str | None = None,
        existing_key: str | None = None,
        enabled: bool = True,
    ) -> ExperimentTracker:
        """Start tracking a run (rank 0 only: ``enabled=False`` gives a tracker that does nothing)."""
        if mode not in MODES:
            raise UserError(f"comet: {mode!r} is not one of {', '.join(MODES)}")
        if not enabled:
            return cls(None, existing_key)
        tracker = cls(Path(run_dir), existing_key)  # reads metrics.csv before Comet starts
        if mode != "off":
            tracker._start_comet(config_dict, mode, experiment_name, existing_key)
        return tracker

    def _start_comet(
        self, config_dict: Mapping[str, Any], mode: str, experiment_name: str | None, existing_key: str | None
    ) -> None:
        """Start the online or offline Comet experiment and log the config to it."""
        assert self.run_dir is not None
        settings = load_comet_settings(self.run_dir)
        if mode == "online" and not settings.api_key:
            raise UserError(
                "comet: online: no COMET_API_KEY in the environment or a .env file "
                f"(looked beside {self.run_dir} and in {Path.cwd()}); set it, or use comet: offline"
            )
        self._secrets = tuple(secret for secret in (settings.api_key, os.environ.get("COMET_API_KEY")) if secret)
        project_name = config_dict.get("comet_project") or settings.project_name
        project_name = redact(project_name, self.secrets) if project_name else None  # --set comet_project=<key>
        offline_dir = self.run_dir / COMET_DIR
        experiment, self.mode = None, "online"
        if mode == "online" or (mode == "auto" and settings.api_key):
            experiment = _start_online(settings, project_name, offline_dir, existing_key, self.secrets)
        if experiment is None:
            experiment, self.mode = _start_offline(settings, project_name, offline_dir, existing_key), "offline"
        if experiment_name:
            experiment.set_name(redact(experiment_name, self.secrets))
        self._experiment, self._key = experiment, experiment.get_key()
        self.log_parameters(config_dict)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What must never be logged: the Comet API key and key-like environment values."""
        return tuple(dict.fromkeys((*self._secrets, *known_secrets())))

    @property
    def key(self) -> str | None:
        """The Comet experiment key, to store in checkpoints so a resumed run continues it."""
        return self._key

    @property
    def metrics_path(self) -> Path | None:
        """``<run_dir>/metrics.csv``, or None for a disabled tracker."""
        return self.run_dir / METRICS_FILE if self.run_dir is not None else None

    def log_parameters(self, parameters: Mapping[str, Any]) -> None:
        """Log parameters (e.g. the resolved config) to Comet, without anything secret."""
        if self._experiment is not None:
            self._experiment.log_parameters(public_parameters(parameters, self.secrets))

    def log_epoch(self, epoch: int, metrics: Mapping[str, float | None]) -> None:
        """Log one epoch's figures to Comet and rewrite ``metrics.csv`` atomically.

        The first call for an epoch in this process replaces that epoch's row and drops
        the rows of later epochs: a resumed run restarts after its last checkpoint, so
        rows logged after that checkpoint by the killed run are repeated, not kept twice
        (and a run resumed from an earlier checkpoint gets one consistent history).
        Further calls for the same epoch add their figures to its row.
        """
        values = {name: float("nan") if value is None else float(value) for name, value in metrics.items()}
        if self.metrics_path is not None:
            if epoch not in self._epochs_logged:
                self._rows = {e: row for e, row in self._rows.items() if e < epoch}
                self._rows[epoch] = {}
                self._epochs_logged.add(epoch)
            self._rows[epoch].update({name: repr(value) for name, value in values.items()})
            write_metrics_csv(self.metrics_path, self._rows)
        if self._experiment is not None:
            finite = {name: value for name, value in values.items() if math.isfinite(value)}
            self._experiment.log_metrics(finite, epoch=epoch, step=epoch)

    def log_confusion_matrix(self, matrix: Any, labels: list[str], epoch: int) -> None:
        """Log a confusion matrix (rows = true) with class names to Comet; nothing locally."""
        if self._experiment is not None:
            rows = [list(row) for row in (matrix.tolist() if hasattr(matrix, "tolist") else matrix)]
            self._experiment.log_confusion_matrix(
                matrix=rows,
                labels=list(labels),
                max_categories=max(25, len(labels)),
                title=f"Confusion matrix, epoch {epoch}",
                file_name=f"confusion-matrix-epoch-{epoch}.json",
                epoch=epoch,
                step=epoch,
            )

    def log_image(self, image: Any, name: str, epoch: int) -> None:
        """Log an image (e.g. a grid of sample predictions) to Comet."""
        if self._experiment is not None:
            self._experiment.log_image(image, name=name, step=epoch)

    def end(self) -> None:
        """Finish the Comet experiment (writes the offline archive); safe to call twice."""
        experiment, self._experiment = self._experiment, None
        if experiment is not None:
            experiment.end()

    def __enter__(self) -> ExperimentTracker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.end()


def _quiet_comet() -> Any:
    """Import comet_ml with all its automatic logging and error reporting switched off."""
    os.environ.update(QUIET_COMET_ENVIRONMENT)
    import comet_ml  # noqa: PLC0415 - after the environment above, which it reads at import

    return comet_ml


def _start_online(
    settings: CometSettings,
    project_name: str | None,
    offline_dir: Path,
    existing_key: str | None,
    secrets: Iterable[str],
) -> Any | None:
    """An online experiment (new, or continuing ``existing_key``), or None with a warning if it is not alive."""
    comet_ml = _quiet_comet()
    options = {**EXPERIMENT_OPTIONS, **EXTRA_OPTIONS, "offline_directory": str(offline_dir)}
    where = {"api_key": settings.api_key, "project_name": project_name, "workspace": settings.workspace}
    try:
        if existing_key:
            experiment = comet_ml.ExistingExperiment(experiment_key=existing_key, **where, **options)
        else:
            experiment = comet_ml.Experiment(**where, **options)
    except Exception as error:  # noqa: BLE001 - any failure to start means: keep the data offline
        reason = redact(f"{type(error).__name__}: {error}".splitlines()[0], secrets)
    else:
        if experiment.alive:
            return experiment
        reason = "the server did not accept the experiment (wrong key or no connection)"
        try:
            experiment.end()
        except Exception:  # noqa: BLE001 - a dead experiment has nothing left to lose
            pass
    log.warning("Comet: could not start online (%s); logging to the offline archive in %s instead", reason, offline_dir)
    return None


def _start_offline(
    settings: CometSettings, project_name: str | None, offline_dir: Path, existing_key: str | None
) -> Any:
    """An offline experiment writing to ``offline_dir``: continuing ``existing_key`` when it is valid."""
    comet_ml = _quiet_comet()
    offline_dir.mkdir(parents=True, exist_ok=True)
    where = {"project_name": project_name, "workspace": settings.workspace, "offline_directory": str(offline_dir)}
    if existing_key:
        try:
            return comet_ml.ExistingOfflineExperiment(experiment_key=existing_key, **where, **EXPERIMENT_OPTIONS)
        except ValueError as error:
            log.warning("Comet: cannot continue experiment %r offline (%s); starting a new one", existing_key, error)
    return comet_ml.OfflineExperiment(**where, **EXPERIMENT_OPTIONS, **EXTRA_OPTIONS)


def public_parameters(parameters: Mapping[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Parameters safe to log: no name that says secret, no value holding one of ``secrets``; paths as text."""
    secrets = tuple(secret for secret in secrets if secret)
    public: dict[str, Any] = {}
    for name, value in parameters.items():
        if any(part in str(name).lower() for part in SECRET_NAME_PARTS):
            continue
        if isinstance(value, Mapping):
            value = public_parameters(value, secrets)
        elif isinstance(value, (list, tuple)):
            value = [str(item) if isinstance(item, Path) else item for item in value]
        elif isinstance(value, Path):
            value = str(value)
        if holds_secret(str(value), secrets):
            continue
        public[str(name)] = value
    return public


def read_metrics_csv(path: Path) -> dict[int, dict[str, str]]:
    """Rows of an existing ``metrics.csv`` by epoch (values kept as written); {} when absent. A file
    that cannot be read, or a row that is not one epoch's metrics, is a one-line ``DataError``."""
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return metrics_rows(path, csv.DictReader(handle))
    except OSError as error:
        raise unreadable_file(path, error, "a metrics.csv file") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable metrics.csv ({str(error).splitlines()[0]})") from None


def metrics_rows(path: Path, reader: csv.DictReader[str]) -> dict[int, dict[str, str]]:
    """``read_metrics_csv``'s rows from an open reader."""
    if reader.fieldnames is None or "epoch" not in reader.fieldnames:
        raise DataError(f"{path}: no 'epoch' column")
    rows: dict[int, dict[str, str]] = {}
    for line, row in enumerate(reader, start=2):
        if None in row:  # more values than columns
            extra = len(row[None])  # DictReader keeps the extra values under None
            raise DataError(f"{path}: line {line}: {len(reader.fieldnames) + extra} values, expected {len(reader.fieldnames)}")
        try:
            epoch = int(row.pop("epoch"))
        except (TypeError, ValueError):
            raise DataError(f"{path}: line {line}: epoch is not an integer") from None
        rows[epoch] = {name: value for name, value in row.items() if value not in ("", None)}
    return rows


def write_metrics_csv(path: Path, rows: Mapping[int, Mapping[str, str]]) -> None:
    """Write ``metrics.csv`` atomically: ``epoch`` then the sorted union of metric names."""
    names = sorted({name for row in rows.values() for name in row})
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["epoch", *names])
        for epoch in sorted(rows):
            writer.writerow([epoch, *(rows[epoch].get(name, "") for name in names)])
