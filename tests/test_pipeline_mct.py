"""The README's data-preparation commands on the real MCT subset, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run_entry_point


@pytest.mark.slow
def test_mct_clean_crop_dataset(shared_data: Path, tmp_path: Path) -> None:
    mct = shared_data / "mct"
    source = json.loads((mct / "mct_cct.json").read_text())
    boxed = [a for a in source["annotations"] if "bbox" in a]
    no_location_images = {i["id"] for i in source["images"] if i["location"] is None}
    clean, crops, out = tmp_path / "clean.json", tmp_path / "crops", tmp_path / "ds"

    steps = [
        ("utils/clean_cct.py", mct / "mct_cct.json", clean, "--dataset", "mct"),
        ("utils/crop_detections.py", clean, crops, "--images-dir", mct / "images", "--crop-strategy", "square",
         "--threads", "2"),
        ("utils/create_classification_dataset.py", out, "--mode", "csv", "cct", "splits", "--crops-dir", crops,
         "--cct-json", clean, "--val-frac", "0.2", "--test-frac", "0.1", "--method", "random", "--seed", "7"),
    ]
    for step in steps:
        result = run_entry_point(*step)
        assert result.returncode == 0, f"{step[0]}: {result.stderr}"

    table = pd.read_csv(out / "classification_ds.csv", dtype=str, keep_default_na=False)
    assert len(table) == len(boxed) == 1108  # every box is one crop, none lost
    ids = {a["id"] for a in boxed if a["image_id"] in no_location_images}
    from_unlocated = table[table["location"].str.startswith("nolocation_seq_")]
    assert len(from_unlocated) == len(ids) > 0  # the unlocated images are kept, grouped by sequence
    splits = {k: {tuple(p) for p in v} for k, v in json.loads((out / "splits.json").read_text()).items()}
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    assert splits["train"] | splits["val"] | splits["test"] == set(zip(table["dataset"], table["location"]))

    again = run_entry_point(*steps[1])
    assert again.returncode == 0 and f"{len(boxed)} requested: 0 new, {len(boxed)} skipped" in again.stdout + again.stderr
    rerun = run_entry_point(steps[2][0], tmp_path / "ds2", *steps[2][2:])
    assert rerun.returncode == 0
    assert (tmp_path / "ds2" / "splits.json").read_bytes() == (out / "splits.json").read_bytes()
