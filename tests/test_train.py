"""Training runs on a tiny real dataset (demo images -> crops -> dataset): outputs, options, checkpoints.

The dataset and run helpers (``build_dataset``, ``write_run``, ``train_command``) are in
tests/helpers/training.py, shared with the other modules that train.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from classification.config import ExperimentConfig, load_config
from classification.data.samples import build_samples
from classification.errors import DataError, UserError
from classification.runtime import DistributedContext, seed_everything
from classification.training.checkpoint import (
    checkpoint_names,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from classification.training.ema import ExponentialMovingAverage
from classification.training.engine import train
from classification.training.hooks import is_improvement
from classification.training.metrics import MetricAccumulator
from classification.training.models import build_model, head_name
from classification.training.optim import lr_factor
from classification.training.resume import newest_checkpoint, repair_best
from classification.training.rng_state import capture_rng_state, restore_rng_state
from classification.training.trainer import build_trainer, train_step
from tests.helpers.processes import run_in_process
from tests.helpers.training import ANIML_CONFIG, TINY, assert_same_tensors, build_dataset, read_metrics, run_train, train_env, write_run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("data"))


# ---------------------------------------------------------------- runs


def test_two_epoch_run_writes_everything_and_no_secret(dataset: Path, tmp_path: Path) -> None:
    secret = "c0met-key-that-must-never-be-written-123"
    config = write_run(tmp_path / "runs" / "tiny" / "baseline", dataset, comet="offline")
    result = run_train(config, "--set", "learning_rate=0.02", COMET_API_KEY=secret)
    assert result.returncode == 0, result.stderr
    run_dir = config.parent
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1.pt", "2.pt", "best.pt", "last.pt"]
    rows = read_metrics(run_dir)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for column in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top3", "val_macro_f1", "val_weighted_f1",
                   "val_ece", "val_recall_deer", "val_precision_bird", "lr", "epoch_seconds", "images_per_second"):
        assert math.isfinite(float(rows[-1][column])), column
    assert yaml.safe_load((run_dir / "resolved_config.yml").read_text())["learning_rate"] == 0.02
    info = yaml.safe_load((run_dir / "run_info.json").read_text())
    assert info["overrides"] == ["learning_rate=0.02"] and "--set" in info["command"]
    archives = list((run_dir / "comet").glob("*.zip"))
    assert len(archives) == 1
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")  # weights_only=True
    assert checkpoint["epoch"] == 2 and checkpoint["batch_in_epoch"] == 0 and checkpoint["comet_key"] == archives[0].stem
    assert checkpoint["label_index"] == {"0": "bird", "1": "deer", "2": "rabbit", "3": "wild_boar"}
    assert checkpoint["config"]["learning_rate"] == 0.02 and checkpoint["ema"] is None
    for path in run_dir.rglob("*"):  # the key is in the environment, and nowhere in the run folder
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as archive:
                    assert all(secret.encode() not in archive.read(name) for name in archive.namelist())


def test_options_freeze_ema_adamw_balanced_loss(dataset: Path, tmp_path: Path) -> None:
    config = load_config(write_run(tmp_path / "run", dataset, optimizer="adamw", learning_rate=0.01, lr_schedule="step",
                                   lr_step_size=1, lr_gamma=0.5, warmup_epochs=1, label_smoothing=0.1, balancing="loss",
                                   ema_decay=0.9, freeze_backbone_epochs=1, augmentation="strong", monitor="val_loss"))
    result = train(config, tmp_path / "run")
    assert result.epochs_completed == 2 and result.exit_code == 0 and result.best_epoch in (1, 2)
    seed_everything(config.seed)
    initial = build_model(config.architecture, 4, pretrained=False).state_dict()
    head = head_name(build_model(config.architecture, 4, pretrained=False)) + "."
    first, second = (load_checkpoint(tmp_path / "run" / "checkpoints" / f"{n}.pt") for n in (1, 2))
    parameters = {name for name, _ in build_model(config.architecture, 4, pretrained=False).named_parameters()}
    backbone = [name for name in parameters if not name.startswith(head)]
    assert all(torch.equal(first["model"][name], initial[name]) for name in backbone)  # frozen in epoch 1
    assert not torch.equal(first["model"][head + "weight"], initial[head + "weight"])  # the head trained
    assert not all(torch.equal(second["model"][name], initial[name]) for name in backbone)  # thawed in epoch 2
    assert "exp_avg_sq" in next(iter(second["optimizer"]["state"].values()))  # AdamW
    assert second["ema"] is not None and second["ema_num_updates"] == second["step"]
    assert not torch.equal(second["ema"][head + "weight"], second["model"][head + "weight"])
    rows = read_metrics(tmp_path / "run")
    assert float(rows[0]["lr"]) == pytest.approx(0.01 * 0.5)  # warm-up done, then halved once per epoch
    assert math.isfinite(float(rows[1]["train_loss"]))


def test_animl_config_and_num_classes_check(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "resnet-18" / "baseline"
    run_dir.mkdir(parents=True)
    config = run_dir / "config.yml"
    config.write_text(ANIML_CONFIG.format(data_root=dataset))  # crops_dir: crops, num_classes: 9, device cuda:3
    fast = ["--set", "device=cpu", "--set", "num_workers=0", "--set", "num_epochs=1", "--set", "image_size=[32, 32]",
            "--set", "batch_size=16", "--set", "architecture=timm:test_efficientnet", "--set", "pretrained=false",
            "--set", "comet=off"]
    result = run_in_process("classifier/train.py", "--config", config, *fast, env=train_env(), cwd=run_dir)  # no 5 s start
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {config}: num_classes: 9, but {dataset / 'label_index.json'} has 4 labels; "
        "remove num_classes (it is read from the dataset) or fix it"]
    result = run_train(config, *fast, "--set", "num_classes=4")
    assert result.returncode == 0, result.stderr
    assert [row["epoch"] for row in read_metrics(run_dir)] == ["1"]


def test_unreadable_images_are_skipped_and_reported_once(dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    config = load_config(write_run(tmp_path / "run", copy, batch_size=4, max_skipped_fraction=0.5))
    train_paths = [sample.path for sample in build_samples(config, "train")]
    truncated, missing = train_paths[0], train_paths[1]
    truncated.write_bytes(truncated.read_bytes()[:200])
    missing.unlink()
    with caplog.at_level(logging.WARNING):
        result = train(config, tmp_path / "run")
    assert result.epochs_completed == 2
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert sorted(warnings) == sorted([f"skipped {truncated} (unreadable image); training goes on without it",
                                       f"skipped {missing} (file not found); training goes on without it"])
    rows = read_metrics(tmp_path / "run")
    assert float(rows[-1]["skipped_images"]) == 2
    assert all(math.isfinite(float(row["train_loss"])) for row in rows)


def test_a_mistyped_crops_dir_is_one_line_before_any_checkpoint(dataset: Path, tmp_path: Path) -> None:
    """Every image "skipped (file not found)", "diverged", exit 0 and 1.pt written: now one line naming the folder."""
    config = write_run(tmp_path / "run", dataset, crops_dir="crops_typo")
    result = run_train(config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    first = build_samples(load_config(config), "train")[0].path
    assert lines[0].startswith(f"error: {dataset / 'crops_typo'}: split 'train' (is the folder right?): ")
    assert "images missing or unreadable, more than max_skipped_fraction (0.05); first: " in lines[0]
    assert str(first) in lines[0]
    assert not list((tmp_path / "run").rglob("*.pt"))


def test_more_unreadable_images_than_max_skipped_fraction_stop_the_run(dataset: Path, tmp_path: Path) -> None:
    """Decode failures found during an epoch count against the same fraction; a few are skipped, too many stop it."""
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    config = load_config(write_run(tmp_path / "run", copy, batch_size=4, max_skipped_fraction=0.1))
    train_paths = [sample.path for sample in build_samples(config, "train")]
    bad = train_paths[: len(train_paths) // 4]
    for path in bad:
        path.write_bytes(path.read_bytes()[:200])  # exists (the stat passes), does not decode
    with pytest.raises(DataError, match=r"split 'train': \d+ of \d+ images missing or unreadable, more than max_skipped_fraction \(0.1\)"):
        train(config, tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.pt"))


def test_a_loss_that_becomes_nan_is_an_error_and_never_best(dataset: Path, tmp_path: Path) -> None:
    """A loss that became NaN was saved as best.pt with exit 0: the run stops with an error and writes no
    checkpoint of the diverged epoch (the weights are poisoned in epoch 2 through the public hook interface)."""
    from classification.training.hooks import Hook  # noqa: PLC0415

    class Poison(Hook):
        def after_step(self, loop: Any) -> None:
            if loop.progress.epoch == 1:  # epoch 1 is done: from epoch 2's first step on, the weights are NaN
                with torch.no_grad():
                    for parameter in loop.trainer.network.parameters():
                        parameter.fill_(math.nan)

    config = load_config(write_run(tmp_path / "run", dataset, num_epochs=3))
    with pytest.raises(DataError, match=r"epoch 2: the training loss is nan: training diverged; lower learning_rate"):
        train(config, tmp_path / "run", hooks=[Poison()])
    saved = {path.name: torch.load(path, map_location="cpu", weights_only=False) for path in (tmp_path / "run").rglob("*.pt")}
    assert "1.pt" in saved and "2.pt" not in saved, sorted(saved)
    assert all(checkpoint["epoch"] == 1 for checkpoint in saved.values()), sorted(saved)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_names_and_keep_policy(tmp_path: Path) -> None:
    assert checkpoint_names(4, every=2, is_best=True, is_final=False) == ["4.pt", "best.pt", "last.pt"]
    assert checkpoint_names(5, every=2, is_best=False, is_final=False) == ["last.pt"]
    assert checkpoint_names(5, every=2, is_best=False, is_final=True) == ["5.pt", "last.pt"]
    for epoch in range(1, 8):
        save_checkpoint({"model": {"w": torch.tensor([float(epoch)])}}, tmp_path, checkpoint_names(epoch, 2, epoch == 3, epoch == 7))
        prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6.pt", "7.pt", "best.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["model"]["w"].item() == 3.0
    assert prune_checkpoints(tmp_path, keep_last=0) == []  # 0 keeps all


def test_last_and_best_are_hard_links_of_the_epoch_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = save_checkpoint({"model": {"w": torch.tensor([4.0])}}, tmp_path, ["4.pt", "best.pt", "last.pt"])
    assert len({path.stat().st_ino for path in paths}) == 1 and paths[0].stat().st_nlink == 3  # written once
    save_checkpoint({"model": {"w": torch.tensor([5.0])}}, tmp_path, ["last.pt"])  # replaced, not changed in place
    assert load_checkpoint(tmp_path / "4.pt")["model"]["w"].item() == 4.0
    assert load_checkpoint(tmp_path / "best.pt")["model"]["w"].item() == 4.0
    assert load_checkpoint(tmp_path / "last.pt")["model"]["w"].item() == 5.0
    assert not list(tmp_path.glob(".*.tmp"))

    def no_links(source: object, target: object) -> None:
        raise OSError(1, "Operation not permitted")  # a filesystem without hard links

    monkeypatch.setattr(os, "link", no_links)
    copies = save_checkpoint({"model": {"w": torch.tensor([6.0])}}, tmp_path / "fat", ["6.pt", "last.pt"])
    assert copies[0].stat().st_ino != copies[1].stat().st_ino and copies[0].read_bytes() == copies[1].read_bytes()
    assert not list((tmp_path / "fat").glob(".*.tmp"))


def test_resolve_and_load_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    save_checkpoint({"model": {}}, directory, ["200.pt", "last.pt"])
    for name in ("last", "last.pt", "200", "200.pt", str(directory / "200.pt")):
        assert resolve_checkpoint(tmp_path, name).is_file()
    with pytest.raises(UserError, match=r"best\.pt: checkpoint not found \(checkpoints in .*: 200\.pt, last\.pt\)"):
        resolve_checkpoint(tmp_path, "best")
    broken = directory / "broken.pt"
    broken.write_bytes((directory / "200.pt").read_bytes()[:50])
    with pytest.raises(DataError, match="not a readable checkpoint"):
        load_checkpoint(broken)
    assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*"))


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of NumPy's state
    save_checkpoint({"model": {}, "rng": capture_rng_state()}, tmp_path, ["last.pt"])
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ---------------------------------------------------------------- schedule and selection


def test_learning_rate_schedules(tmp_path: Path) -> None:
    config = load_config(write_run(tmp_path, tmp_path, num_epochs=10, warmup_epochs=2))
    assert [lr_factor(s, 5, config) for s in range(3)] == [0.1, 0.2, 0.3]  # linear warm-up over 2 epochs of 5 steps
    assert lr_factor(10, 5, config) == 1.0 and lr_factor(49, 5, config) == pytest.approx(0.0, abs=1e-2)
    step = config.model_copy(update={"lr_schedule": "step", "lr_step_size": 3, "lr_gamma": 0.5, "warmup_epochs": 0})
    assert [lr_factor(e * 5, 5, step) for e in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]
    assert lr_factor(33, 5, config.model_copy(update={"lr_schedule": "constant"})) == 1.0


def test_monitor_direction() -> None:
    assert is_improvement(0.5, None, "val_top1") and is_improvement(0.6, 0.5, "val_top1")
    assert not is_improvement(0.5, 0.5, "val_top1") and not is_improvement(float("nan"), None, "val_top1")
    assert is_improvement(0.4, 0.5, "val_loss") and not is_improvement(0.6, 0.5, "val_loss")


def test_resume_picks_the_newest_checkpoint_after_a_cut_short_save(tmp_path: Path) -> None:
    """kill -9 between writing 3.pt and last.pt: 3.pt is the state to resume from, and best.pt is repaired."""
    state = {"model": {}, "best_epoch": 3, "batch_in_epoch": 0}
    save_checkpoint({**state, "epoch": 2, "best_epoch": 2}, tmp_path, ["2.pt", "best.pt", "last.pt"])
    save_checkpoint({**state, "epoch": 3}, tmp_path, ["3.pt"])  # ... and killed here
    assert newest_checkpoint(tmp_path) == tmp_path / "3.pt"
    assert repair_best(tmp_path, load_checkpoint(tmp_path / "3.pt"), tmp_path / "3.pt")
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    save_checkpoint({**state, "epoch": 3, "batch_in_epoch": 5}, tmp_path, ["last.pt"])  # a signal in epoch 4
    assert newest_checkpoint(tmp_path) == tmp_path / "last.pt"
    save_checkpoint({**state, "epoch": 4}, tmp_path, ["4.pt", "best.pt", "last.pt"])
    assert newest_checkpoint(tmp_path) == tmp_path / "last.pt"  # a tie goes to last.pt
    assert newest_checkpoint(tmp_path / "none") is None


def test_a_step_the_fp16_scaler_skips_moves_neither_the_schedule_nor_the_ema(tmp_path: Path) -> None:
    config = ExperimentConfig(data_root=tmp_path, **{**TINY, "ema_decay": 0.9})
    trainer = build_trainer(config, 3, [0, 1, 2], 10, torch.device("cpu"), DistributedContext())
    trainer = replace(trainer, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))  # fp16's scaler, on the CPU
    labels = torch.tensor([0, 1, 2, 0])
    train_step(trainer, torch.rand(4, 3, 32, 32), labels, MetricAccumulator(3))
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    assert trainer.ema is not None
    steps, averaged = trainer.scheduler.last_epoch, int(trainer.ema.n_averaged)
    train_step(trainer, torch.full((4, 3, 32, 32), math.inf), labels, MetricAccumulator(3))  # inf gradients: skipped
    assert trainer.scaler.get_scale() == 2.0**15
    assert (trainer.scheduler.last_epoch, int(trainer.ema.n_averaged)) == (steps, averaged)
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.named_parameters())  # no optimizer step
    train_step(trainer, torch.rand(4, 3, 32, 32), labels, MetricAccumulator(3))
    assert (trainer.scheduler.last_epoch, int(trainer.ema.n_averaged)) == (steps + 1, averaged + 1)


def test_the_ema_equals_torchs_averaged_model_and_keeps_its_counter_on_the_cpu() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.rand(2, 3, 8, 8))
    ours = ExponentialMovingAverage(model, 0.9)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):
        model(torch.rand(2, 3, 8, 8)).sum().backward()
        optimizer.step()
        ours.update_parameters(model)
        torchs.update_parameters(model)
    assert_same_tensors(ours.module.state_dict(), torchs.module.state_dict())
    assert int(ours.n_averaged) == 4 and ours.n_averaged.device.type == "cpu"
