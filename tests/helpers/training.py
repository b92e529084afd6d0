"""A tiny dataset built by the library's own pipeline, tiny training runs on it, and comparing checkpoints."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from classification.data.dataset import DatasetOptions, create_classification_dataset
from classification.demo import make_demo_dataset
from tests.helpers.processes import REPO_ROOT

# animl-ml's classification/runs/resnet-18/baseline/config.yml, verbatim but for data_root.
ANIML_CONFIG = """\
# Here's where you define experiment-specific hyperparameters.
# You can also create lists and group parameters together into nested sub-parts.
# In Python, this is all read as a dict.

# environment/computational parameters
seed: 32678456782 # random number generator seed (long integer value)
device: 'cuda:3'
num_workers: 20 # number of CPU cores that are allocated to support (load images) to the GPU

# dataset parameters
data_root: {data_root}
crops_dir: crops
num_classes: 9

# training hyperparameters
image_size: [224, 224]
num_epochs: 200
batch_size: 1024
learning_rate: 0.001
weight_decay: 0.001
"""


TINY: dict[str, Any] = {
    "architecture": "timm:test_efficientnet", "pretrained": False, "image_size": 32, "batch_size": 8,
    "num_workers": 0, "comet": "off", "learning_rate": 0.05, "num_epochs": 2, "log_sample_predictions": 4,
}


def build_dataset(root: Path, n_locations: int = 6, sequences: int = 3, frames: int = 2) -> Path:
    """Demo camera-trap images cropped and split by the library's own pipeline; crops in ``<dataset>/crops``."""
    cct = make_demo_dataset(root / "raw", n_locations, sequences, frames, seed=0)
    dataset = root / "dataset"
    crop_detections(cct, dataset / "crops", root / "raw" / "images", CropOptions(crop_strategy="pad", max_size=64))
    create_classification_dataset(dataset, DatasetOptions(crops_dir=dataset / "crops", cct_json=cct, val_frac=0.25,
                                                          test_frac=0.2, candidates=500, seed=0))
    return dataset


def write_run(run_dir: Path, dataset: Path, **options: Any) -> Path:
    """``run_dir/config.yml`` for a tiny model on ``dataset``; ``options`` override ``TINY``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"data_root": str(dataset), "crops_dir": "crops", **TINY, **options}
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_env(**extra: str) -> dict[str, str]:
    """One thread per process (fast and reproducible on 2 cores), no Comet key unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMET_")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def train_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "classifier" / "train.py"), "--config", str(config), *args]


def run_train(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run classifier/train.py as a user would (from the run folder, so no .env of the repo is read)."""
    return subprocess.run(train_command(config, *args), capture_output=True, text=True, cwd=config.parent,
                          env=train_env(**env), timeout=600)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested checkpoint structures (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
