"""Epoch hooks: the loop calls them at fixed points and in order, their state rides in the checkpoint,
and a checkpoint written before a hook existed still loads (its entries default)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from classification.config import load_config
from classification.training.checkpoint import load_checkpoint
from classification.training.engine import train
from classification.training.hooks import EarlyStopping, EpochEnd, Hook, Loop, MetricsStore
from tests.helpers.training import build_dataset, write_run


def epoch_end(epoch: int, val_loss: float) -> EpochEnd:
    return EpochEnd(epoch, {"val_loss": val_loss}, confusion=None, label_names=[], last_scheduled=False)


def test_early_stopping_counts_epochs_without_improvement_and_asks_the_loop_to_stop() -> None:
    loop = SimpleNamespace(metrics=MetricsStore("val_loss"), should_stop=False)  # what EarlyStopping reads of the loop
    hook = EarlyStopping(patience=2)
    best, stops = [], []
    for epoch, loss in enumerate([1.0, 0.5, 0.7, float("nan")], start=1):
        end = epoch_end(epoch, loss)
        loop.metrics.record(epoch, end.metrics)  # the loop records an epoch before its hooks run
        hook.after_epoch(loop, end)
        best.append(loop.metrics.latest_is_best)
        stops.append(loop.should_stop)
    assert best == [True, True, False, False]
    assert stops == [False, False, False, True]
    assert {**loop.metrics.state_dict(), **hook.state_dict()} == {"best_metric": 0.5, "best_epoch": 2, "early_stopping_counter": 2}
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(hook.state_dict())
    assert restored.triggered()
    assert not EarlyStopping(patience=3).triggered()


def test_hook_state_missing_from_an_old_checkpoint_defaults() -> None:
    hook, metrics = EarlyStopping(patience=None), MetricsStore("val_top1")
    old = {"epoch": 3, "step": 12}  # written before the hook and the store had state
    hook.load_state_dict(old)
    metrics.load_state_dict(old)
    assert (metrics.best_metric, metrics.best_epoch, hook.counter, hook.triggered()) == (None, None, 0, False)


class StopAtEpoch(Hook):
    """A user's stopping rule: asks the loop to end the run after ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        loop.should_stop = loop.should_stop or end.epoch >= self.epoch


def test_a_user_hook_stops_the_run_and_the_last_epoch_is_checkpointed(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "data", n_locations=4, sequences=2, frames=2)
    config_path = write_run(tmp_path / "run", dataset, num_epochs=4, checkpoint_every=3)
    result = train(load_config(config_path), config_path.parent, hooks=[StopAtEpoch(2)])
    assert result.stopped_early and result.epochs_completed == 2
    names = {p.name for p in (config_path.parent / "checkpoints").glob("*.pt")}
    assert "2.pt" in names and "3.pt" not in names  # the run's last epoch is saved although 2 is not a multiple of 3


class Recording(Hook):
    """Records every call; its state (steps seen) goes into the checkpoint under its own key."""

    def __init__(self, calls: list[str]) -> None:
        self.calls, self.steps = calls, 0

    def before_train(self, loop: Loop) -> None:
        self.calls.append("before_train")

    def after_step(self, loop: Loop) -> None:
        self.steps += 1

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        self.calls.append(f"after_epoch {end.epoch}")

    def after_train(self, loop: Loop) -> None:
        self.calls.append("after_train")

    def state_dict(self) -> dict[str, Any]:
        return {"recording_steps": self.steps}

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self.steps = int(checkpoint.get("recording_steps", 0))


def test_a_new_hook_needs_no_loop_code_and_resumes_with_its_state(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "data", n_locations=4, sequences=2, frames=2)
    calls: list[str] = []
    config_path = write_run(tmp_path / "run", dataset, num_epochs=1)
    recording = Recording(calls)
    train(load_config(config_path), config_path.parent, hooks=[recording])
    first = load_checkpoint(config_path.parent / "checkpoints" / "last.pt")
    assert calls == ["before_train", "after_epoch 1", "after_train"]
    assert first["recording_steps"] == first["step"] == recording.steps > 0  # the checkpoint comes after it

    calls.clear()
    resumed = Recording(calls)
    train(load_config(config_path, ["num_epochs=2"]), config_path.parent, hooks=[resumed])
    second = load_checkpoint(config_path.parent / "checkpoints" / "last.pt")
    assert calls == ["before_train", "after_epoch 2", "after_train"]
    assert second["recording_steps"] == second["step"] == 2 * first["step"]



class LearningRateLog(Hook):
    """A user's hook, written outside the library: the learning rate after every epoch, one line each."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_epoch(self, loop: Loop, end: EpochEnd) -> None:
        with open(self.path, "a") as handle:
            handle.write(f"{end.epoch},{loop.trainer.optimizer.param_groups[0]['lr']:.6g}\n")


def test_a_user_hook_logs_the_learning_rate_through_train(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "data", n_locations=4, sequences=2, frames=2)
    config_path = write_run(tmp_path / "run", dataset, num_epochs=2, lr_schedule="constant", learning_rate=0.02)
    log_file = tmp_path / "lr.csv"
    train(load_config(config_path), config_path.parent, hooks=[LearningRateLog(log_file)])
    assert log_file.read_text().splitlines() == ["1,0.02", "2,0.02"]
