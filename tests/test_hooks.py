"""Epoch hooks: the loop calls them at fixed points and in order, their state rides in the checkpoint,
and a checkpoint written before a hook existed still loads (its entries default)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from classification.config import load_config
from classification.training import engine
from classification.training.checkpoint import load_checkpoint
from classification.training.engine import TrainingLoop, train
from classification.training.hooks import Checkpointer, EarlyStopping, EpochEnd, Hook
from tests.test_train import build_dataset, write_run


def epoch_end(epoch: int, val_loss: float) -> EpochEnd:
    return EpochEnd(epoch, {"val_loss": val_loss}, confusion=None, label_names=[], final=False)


def test_early_stopping_counts_epochs_without_improvement_and_ends_the_run() -> None:
    hook = EarlyStopping("val_loss", patience=2)
    ends = [epoch_end(epoch, loss) for epoch, loss in enumerate([1.0, 0.5, 0.7, float("nan")], start=1)]
    for end in ends:
        hook.after_epoch(None, end)  # type: ignore[arg-type]  # EarlyStopping reads nothing of the loop
    assert [end.improved for end in ends] == [True, True, False, False]
    assert [end.stop_early for end in ends] == [False, False, False, True]
    assert [end.final for end in ends] == [False, False, False, True]
    assert hook.state_dict() == {"best_metric": 0.5, "best_epoch": 2, "early_stopping_counter": 2}
    restored = EarlyStopping("val_loss", patience=2)
    restored.load_state_dict(hook.state_dict())
    assert restored.triggered() and restored.best_epoch == 2


def test_hook_state_missing_from_an_old_checkpoint_defaults() -> None:
    hook = EarlyStopping("val_top1", patience=None)
    hook.load_state_dict({"epoch": 3, "step": 12})  # written before the hook had state
    assert (hook.best_metric, hook.best_epoch, hook.counter, hook.triggered()) == (None, None, 0, False)


class Recording(Hook):
    """Records every call; its state (steps seen) goes into the checkpoint under its own key."""

    def __init__(self, calls: list[str]) -> None:
        self.calls, self.steps = calls, 0

    def before_train(self, loop: TrainingLoop) -> None:
        self.calls.append("before_train")

    def after_step(self, loop: TrainingLoop) -> None:
        self.steps += 1

    def after_epoch(self, loop: TrainingLoop, end: EpochEnd) -> None:
        self.calls.append(f"after_epoch {end.epoch}")

    def after_train(self, loop: TrainingLoop) -> None:
        self.calls.append("after_train")

    def state_dict(self) -> dict[str, Any]:
        return {"recording_steps": self.steps}

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self.steps = int(checkpoint.get("recording_steps", 0))


def test_a_new_hook_needs_no_loop_code_and_resumes_with_its_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = build_dataset(tmp_path / "data", n_locations=4, sequences=2, frames=2)
    calls: list[str] = []
    added: list[Recording] = []
    build_loop = engine.build_loop

    def with_recording(*args: Any, **kwargs: Any) -> TrainingLoop:
        loop = build_loop(*args, **kwargs)
        assert isinstance(loop.hooks[-1], Checkpointer)  # the checkpoint comes last, so it holds the others' state
        added.append(Recording(calls))
        loop.hooks.insert(len(loop.hooks) - 1, added[-1])
        return loop

    monkeypatch.setattr(engine, "build_loop", with_recording)
    config_path = write_run(tmp_path / "run", dataset, num_epochs=1)
    train(load_config(config_path), config_path.parent)
    first = load_checkpoint(config_path.parent / "checkpoints" / "last.pt")
    assert calls == ["before_train", "after_epoch 1", "after_train"]
    assert first["recording_steps"] == first["step"] == added[0].steps > 0

    calls.clear()
    train(load_config(config_path, ["num_epochs=2"]), config_path.parent)
    second = load_checkpoint(config_path.parent / "checkpoints" / "last.pt")
    assert calls == ["before_train", "after_epoch 2", "after_train"]
    assert second["recording_steps"] == second["step"] == 2 * first["step"]
