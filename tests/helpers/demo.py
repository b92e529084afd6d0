"""A demo dataset made by the pipeline's entry points, and a tiny model trained on it by classifier/train.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from classification.data.clean import CleanOptions, clean_cct
from classification.demo import make_demo_dataset
from tests.helpers.processes import REPO_ROOT, run_entry_point, run_in_process
from tests.helpers.training import train_env, write_run


@dataclass(frozen=True)
class DemoData:
    """Paths of a small dataset made by the pipeline's own entry points."""

    raw_cct: Path
    images_dir: Path
    clean_cct: Path
    crops_dir: Path
    dataset_dir: Path


def build_demo_dataset(root: Path, seed: int = 0) -> DemoData:
    """Generate demo images, clean them, crop them and build the dataset, as a user would (~1.5 s)."""
    raw_cct = make_demo_dataset(root / "raw", n_locations=6, sequences_per_location=2, frames_per_sequence=2, seed=seed)
    data = DemoData(raw_cct, root / "raw" / "images", root / "interim" / "clean_cct.json",
                    root / "interim" / "crops", root / "processed")
    clean_cct(raw_cct, data.clean_cct, CleanOptions(dataset="demo"))
    crop = run_entry_point("utils/crop_detections.py", data.clean_cct, data.crops_dir, "--images-dir",
                           data.images_dir, "--crop-strategy", "pad", "--threads", "2")
    assert crop.returncode == 0, crop.stderr
    build = run_entry_point("utils/create_classification_dataset.py", data.dataset_dir, "--mode", "csv", "cct", "splits",
                            "--crops-dir", data.crops_dir, "--cct-json", data.clean_cct, "--val-frac", "0.2",
                            "--test-frac", "0.2", "--seed", "0", "--candidates", "300")
    assert build.returncode == 0, build.stderr
    return data


@dataclass(frozen=True)
class TrainedRun:
    """A two-epoch tiny model on a demo dataset."""

    data: DemoData
    config: Path

    @property
    def run_dir(self) -> Path:
        return self.config.parent


def run_predict(*args: object) -> subprocess.CompletedProcess[str]:
    """classifier/predict.py as a user runs it."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "classifier" / "predict.py"), *map(str, args)],
                          capture_output=True, text=True, env=train_env(), timeout=600)


def predict_here(*args: object) -> subprocess.CompletedProcess[str]:
    """The same, in this process (``run_in_process``; test_split_test_scores_exactly_the_test_crops runs the real one)."""
    return run_in_process("classifier/predict.py", *args, env=train_env())


def split_paths(dataset_dir: Path, split: str) -> list[str]:
    """Crop paths of ``split``, straight from classification_ds.csv and splits.json."""
    frame = pd.read_csv(dataset_dir / "classification_ds.csv", dtype=str, keep_default_na=False)
    keys = {tuple(pair) for pair in json.loads((dataset_dir / "splits.json").read_text())[split]}
    return [path for path, *key in zip(frame["path"], frame["dataset"], frame["location"]) if tuple(key) in keys]


def train_demo_run(root: Path) -> TrainedRun:
    """A demo dataset under ``root`` and a two-epoch tiny model trained on it (the ``trained`` fixture)."""
    data = build_demo_dataset(root / "demo")
    config = write_run(root / "runs" / "tiny" / "demo", data.dataset_dir, crops_dir=str(data.crops_dir), num_epochs=2)
    result = run_in_process("classifier/train.py", "--config", config, env=train_env(), cwd=config.parent)
    assert result.returncode == 0, result.stderr
    return TrainedRun(data, config)
