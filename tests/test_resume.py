"""Exact resume: a run killed (kill -9) or stopped (SIGTERM, Ctrl-C) and resumed ends with the same
bits as a run never interrupted; and the run-folder rules (--no-resume, --overwrite, --force).

The interrupted runs use 2 data-loading workers and the reference run none: the result must
not depend on that either.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from classification.config import config_hash, hashed_fields, load_config
from classification.errors import UserError
from classification.training.checkpoint import load_checkpoint
from classification.training.engine import train
from classification.training.resume import check_resumable, newest_checkpoint
from tests.helpers.processes import run_in_process
from tests.helpers.training import assert_same_tensors, build_dataset, read_metrics, run_train, train_command, train_env, write_run

EPOCHS = 4
OPTIONS = {  # enough batches per epoch to stop in one; dropout (draws from the torch RNG), EMA, warm-up, cosine, weighted sampler
    "architecture": "mobilenet_v3_small", "image_size": 64, "batch_size": 4, "num_epochs": EPOCHS, "learning_rate": 0.05,
    "warmup_epochs": 1, "ema_decay": 0.9, "balancing": "sampler", "checkpoint_keep_last": 0,
}
# Everything a checkpoint holds that decides what happens next (the config differs: num_workers).
STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "ema", "ema_num_updates", "epoch", "step", "batch_in_epoch",
              "best_metric", "best_epoch", "early_stopping_counter", "rng", "label_index", "config_hash")
TIMING_COLUMNS = ("epoch_seconds", "images_per_second")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of EPOCHS epochs that nothing interrupted (no loader workers)."""
    root = tmp_path_factory.mktemp("resume")
    dataset = build_dataset(root, n_locations=8, sequences=4, frames=3)
    config = write_run(root / "reference", dataset, num_workers=0, **OPTIONS)
    result = run_train(config)
    assert result.returncode == 0, result.stderr
    return config.parent


def start_run(run_dir: Path) -> subprocess.Popen[str]:
    """The same experiment as ``reference`` (with 2 loader workers), as a process we can interrupt."""
    return subprocess.Popen(train_command(run_dir / "config.yml"), cwd=run_dir, env=train_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def new_run(reference: Path, tmp_path: Path) -> Path:
    dataset = Path(load_checkpoint(reference / "checkpoints" / "last.pt")["config"]["data_root"])
    return write_run(tmp_path / "run", dataset, num_workers=2, **OPTIONS).parent


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 120) -> None:
    """Poll ``condition`` every 5 ms while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended early: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def epoch_seconds(reference: Path, epoch: int) -> float:
    return float(read_metrics(reference)[epoch - 1]["epoch_seconds"])


def assert_same_run(reference: Path, run_dir: Path) -> None:
    """Bitwise-equal final state (weights, optimizer buffers, schedule, EMA, RNG) and equal metrics."""
    for name in ("last.pt", f"{EPOCHS}.pt", "best.pt"):
        expected, got = load_checkpoint(reference / "checkpoints" / name), load_checkpoint(run_dir / "checkpoints" / name)
        for key in STATE_KEYS:
            assert_same_tensors(expected[key], got[key], f"{name}:{key}")
    expected_rows, got_rows = read_metrics(reference), read_metrics(run_dir)
    assert [row["epoch"] for row in got_rows] == [str(e) for e in range(1, EPOCHS + 1)]
    for expected_row, got_row in zip(expected_rows, got_rows):
        assert {k: v for k, v in got_row.items() if k not in TIMING_COLUMNS} == {
            k: v for k, v in expected_row.items() if k not in TIMING_COLUMNS}


def test_kill_9_at_a_random_moment_then_resume_gives_identical_weights(reference: Path, tmp_path: Path) -> None:
    run_dir = new_run(reference, tmp_path)
    process = start_run(run_dir)
    wait_for(lambda: (run_dir / "checkpoints" / "1.pt").exists(), process)
    delay = random.uniform(0.0, 0.9 * epoch_seconds(reference, 2))
    time.sleep(delay)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL, f"not killed mid-run (delay {delay:.3f} s)"
    newest = newest_checkpoint(run_dir / "checkpoints")  # last.pt, or 1.pt when killed between the two writes
    assert newest is not None and load_checkpoint(newest)["epoch"] < EPOCHS
    result = run_train(run_dir / "config.yml")  # --resume is the default
    assert result.returncode == 0, result.stderr
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # a write cut short by the kill is cleaned up
    assert_same_run(reference, run_dir)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_mid_epoch_state_that_resumes_identically(reference: Path, tmp_path: Path, signum: int) -> None:
    run_dir = new_run(reference, tmp_path)
    process = start_run(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    wait_for(lambda: last.exists() and (run_dir / "metrics.csv").is_file(), process)  # epoch 1 saved; epoch 2 training
    # a quarter of this run's own epoch 1 (not the reference's, which has no loader workers and may
    # have run on a busier machine): well inside epoch 2's training batches
    time.sleep(0.25 * epoch_seconds(run_dir, 1))
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)  # Ctrl-C reaches the whole process group, loader workers included
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "resumes from here" in stderr and "Traceback" not in stderr
    state = load_checkpoint(last)
    assert (state["epoch"], state["batch_in_epoch"] > 0) == (1, True), "not stopped in the middle of epoch 2"
    result = run_train(run_dir / "config.yml")
    assert result.returncode == 0, result.stderr
    assert "starting at epoch 2, batch" in result.stderr
    assert_same_run(reference, run_dir)


def copy_run(reference: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


def test_no_resume_refuses_and_overwrite_archives(reference: Path, tmp_path: Path) -> None:
    run_dir = copy_run(reference, tmp_path)
    config = run_dir / "config.yml"
    result = run_in_process("classifier/train.py", "--config", config, "--no-resume", env=train_env(), cwd=run_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {run_dir}: has an earlier run (1.pt, 2.pt, 3.pt, 4.pt, best.pt, last.pt); continue it with --resume, "
        f"or start again with --no-resume --overwrite (moves it to {run_dir / 'archive'}/<time>/)"]
    with pytest.raises(UserError, match="--overwrite only applies with --no-resume"):
        train(load_config(config), run_dir, resume=True, overwrite=True)
    train(load_config(config, ["num_epochs=1"]), run_dir, resume=False, overwrite=True)
    (archived,) = (run_dir / "archive").iterdir()
    assert load_checkpoint(archived / "checkpoints" / "last.pt")["epoch"] == EPOCHS  # nothing was deleted
    assert len(read_metrics(archived)) == EPOCHS and (archived / "run_info.json").is_file()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1 and len(read_metrics(run_dir)) == 1


def test_changed_config_is_refused_unless_forced(reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = copy_run(reference, tmp_path)
    config, last = run_dir / "config.yml", run_dir / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert train(load_config(config), run_dir).epochs_completed == EPOCHS
    assert f"already trained {EPOCHS} epochs" in caplog.text and last.stat().st_mtime_ns == before
    with pytest.raises(UserError) as refused:
        train(load_config(config, ["learning_rate=0.5"]), run_dir, config_path=config)
    assert str(refused.value) == (f"{config}: changed since {last} (learning_rate: 0.05 -> 0.5); resume anyway with "
                                  "--force, or start again with --no-resume --overwrite")
    longer = load_config(config, ["learning_rate=0.5", f"num_epochs={EPOCHS + 1}"])  # num_epochs alone needs no --force
    assert train(longer, run_dir, force=True).epochs_completed == EPOCHS + 1
    rows = read_metrics(run_dir)
    assert len(rows) == EPOCHS + 1 and rows[:EPOCHS] == read_metrics(reference)
    assert load_checkpoint(last)["config"]["learning_rate"] == 0.5


def test_checkpoint_from_before_the_input_statistics_keys_resumes_with_what_it_was_trained_with(tmp_path: Path) -> None:
    """A run saved before ``mean``/``std``/``interpolation``/``pretrained_source`` existed (ImageNet statistics,
    bilinear) resumes without --force, and keeps those statistics, though the weights' own (timm's: bicubic,
    160 px for this model) now differ."""
    dataset = build_dataset(tmp_path / "data", n_locations=4, sequences=2, frames=1)
    config = write_run(tmp_path / "run", dataset, num_epochs=1)
    (config.parent / "config.yml").write_text(config.read_text().replace("image_size: 32\n", ""))
    run_dir = config.parent
    train(load_config(config), run_dir)
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):  # as the version before these keys wrote it
        checkpoint = load_checkpoint(path)
        old = {k: v for k, v in checkpoint["config"].items() if k not in ("pretrained_source", "mean", "std", "interpolation")}
        old["image_size"] = 32  # the old default was 224; what the run used is saved
        checkpoint["config"], checkpoint["config_hash"] = old, config_hash(hashed_fields(old))
        path.unlink()
        torch.save(checkpoint, path)
    result = train(load_config(config, ["num_epochs=2"]), run_dir, config_path=config)
    assert result.epochs_completed == 2
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]
    assert (saved["image_size"], saved["mean"], saved["std"], saved["interpolation"]) == (
        32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "bilinear")


def test_a_changed_setting_holding_a_secret_is_shown_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """``--set train_split=<key>`` on a resume: the refusal and the --force warning name the field, never the key."""
    secret = "c0met-key-given-by-set-0123456789"
    monkeypatch.setenv("COMET_API_KEY", secret)
    dataset = build_dataset(tmp_path / "data", n_locations=4, sequences=1, frames=1)
    config_path = write_run(tmp_path / "run", dataset, num_epochs=1)
    before = load_config(config_path)
    checkpoint = {"label_index": {}, "config": before.to_dict(), "config_hash": config_hash(before)}
    changed = load_config(config_path, [f"train_split={secret}"])
    with pytest.raises(UserError) as refused:
        check_resumable(checkpoint, tmp_path / "last.pt", changed, {}, force=False, config_path=config_path)
    assert "train_split: 'train' -> '***'" in str(refused.value) and secret not in str(refused.value)
    with caplog.at_level(logging.WARNING):
        check_resumable(checkpoint, tmp_path / "last.pt", changed, {}, force=True, config_path=config_path)
    assert "train_split: 'train' -> '***'" in caplog.text and secret not in caplog.text
