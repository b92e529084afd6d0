"""torchrun with two CPU processes (gloo): trains, writes every file once from rank 0, and resumes under DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from classification.config import ExperimentConfig, load_config
from classification.training.checkpoint import load_checkpoint
from classification.training.data import build_loader, build_samples
from classification.training.models import build_model, resolve_inputs
from tests.conftest import REPO_ROOT
from tests.test_train import build_dataset, read_metrics, train_env, write_run


def torchrun(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 classifier/train.py --config CONFIG ...``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "classifier" / "train.py"), "--config", str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=config.parent, env=train_env(), timeout=600)


def evaluate_alone(config: ExperimentConfig, weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Validation loss and top-1 of ``weights`` in this one process (no sharding)."""
    model = build_model(config.architecture, 4, pretrained=False)
    model.load_state_dict(weights)
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for batch in build_loader(resolve_inputs(config), build_samples(config, config.val_split), train=False):
            logits = model(batch.images)
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(1) == batch.labels).sum())
            count += len(batch)
    return loss_sum / count, correct / count


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_resume(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "data")
    config = write_run(tmp_path / "runs" / "tiny" / "ddp", dataset, comet="offline", ema_decay=0.9)
    run_dir = config.parent
    result = torchrun(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("epoch 2/2:") == 1  # one log line per epoch: rank 0 only
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1.pt", "2.pt", "best.pt", "last.pt"]
    assert [row["epoch"] for row in read_metrics(run_dir)] == ["1", "2"]
    (archive,) = (run_dir / "comet").glob("*.zip")  # one Comet experiment, from rank 0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["resumed_from"] is None
    first = read_metrics(run_dir)
    loss, top1 = evaluate_alone(load_config(config), load_checkpoint(run_dir / "checkpoints" / "2.pt")["ema"])
    assert float(first[1]["val_loss"]) == pytest.approx(loss, rel=1e-5)  # the two shards cover val exactly once
    assert float(first[1]["val_top1"]) == pytest.approx(top1)

    result = torchrun(config, "--resume", "--set", "num_epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting at epoch 3" in result.stderr
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["epoch"] == 3 and checkpoint["comet_key"] == archive.stem  # the same Comet experiment goes on
    assert checkpoint["ema"] is not None
    rows = read_metrics(run_dir)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"] and rows[:2] == first
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["resumed_from"].endswith("last.pt")
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporary file left behind
