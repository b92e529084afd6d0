"""Location-held-out against time-held-out test accuracy on the real MCT crops (issue 11 §5).

    OMP_NUM_THREADS=1 python benchmarks/bench_time_splits.py [--seeds 0 1 2] [--methods probe mlp]

Crops MCT once (``bench_pretrained.prepare_crops``), builds three datasets from the same crops
with ``create_classification_dataset``: ``location`` (``--split-by location``, 60/20/20, the
seed's own search), ``time`` (``--split-by time``: the last 20% of every location's crops by
time to test, the 20% before them to val) and ``period`` (``--split-by time`` with calendar
periods, by default chosen so that MCT's latest ~20% of crops are test and the ~20% before
them val). The time splits have no randomness, so one split serves all seeds; crops without a
datetime are kept in train so that every dataset holds the same crops. It scores the same heads on the frozen
packaged EfficientNet-Lite0 features (``bench_pretrained.backbone_features``, computed once
and cached): the logistic-regression probe and the MLP head.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench_pretrained import REPO, backbone_features, labels_of, mlp_scores, prepare_crops, probe_scores
from classification.config import ExperimentConfig
from classification.data.dataset import DatasetOptions, create_classification_dataset
from classification.data.samples import build_samples, load_label_index

KINDS = ("location", "time", "period")


def prepare_dataset(workdir: Path, clean: Path, crops: Path, kind: str, seed: int, periods: tuple[str, str]) -> tuple[Path, dict]:
    """The dataset split the ``kind`` way (see the module doc), built once; its split report."""
    dataset = workdir / f"dataset_{kind}_seed{seed}"
    test_period, val_period = periods if kind == "period" else (None, None)
    if not (dataset / "split_report.json").is_file():
        options = DatasetOptions(crops_dir=crops, cct_json=clean, val_frac=0.2, test_frac=0.2, seed=seed,
                                 split_by="location" if kind == "location" else "time", missing_datetimes="train",
                                 test_period=test_period, val_period=val_period)
        create_classification_dataset(dataset, options)
    return dataset, json.loads((dataset / "split_report.json").read_text())


def evaluate(workdir: Path, dataset: Path, crops: Path, architecture: str, methods: list[str], seed: int) -> dict[str, dict]:
    """Test top-1 and macro-F1 of each head trained on ``dataset``'s train split."""
    config = ExperimentConfig(data_root=dataset, crops_dir=crops)
    splits = {name: build_samples(config, name) for name in ("train", "val", "test")}
    labels = {name: labels_of(samples) for name, samples in splits.items()}
    num_classes = len(load_label_index(dataset, "train"))
    features = backbone_features(workdir, architecture, splits)
    results = {}
    for method in methods:
        result = probe_scores(features, labels, num_classes) if method == "probe" else mlp_scores(features, labels, num_classes, seed)
        results[method] = {**result, "train": len(splits["train"]), "test": len(splits["test"]),
                           "test_classes": int(np.unique(labels["test"]).size)}
    return results


def main(argv: list[str] | None = None) -> int:
    """Both split kinds, every seed and head; one row each, then the mean over seeds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=["probe", "mlp"], default=["probe", "mlp"])
    parser.add_argument("--architecture", default="efficientnet_lite0")
    parser.add_argument("--workdir", type=Path, default=REPO / "data" / "interim" / "bench_pretrained")
    parser.add_argument("--test-period", default="2011-06-07..2012", help="the period split's test period")
    parser.add_argument("--val-period", default="2011-05-26..2011-06-06", help="the period split's val period")
    args = parser.parse_args(argv)
    clean, crops = prepare_crops(args.workdir)
    rows = []
    for split_by in KINDS:
        for seed in args.seeds if split_by == "location" else args.seeds[:1]:
            dataset, report = prepare_dataset(args.workdir, clean, crops, split_by, seed, (args.test_period, args.val_period))
            apart = report.get("time", {}).get("apart", {}).get("train/test", {})
            for method, result in evaluate(args.workdir, dataset, crops, args.architecture, args.methods, seed).items():
                rows.append((split_by, method, result["top1"], result["macro_f1"]))
                print(f"{split_by:9s} seed {seed} {method:6s} top1 {result['top1']:.3f} macro-F1 {result['macro_f1']:.3f}"
                      f"  train {result['train']} test {result['test']} ({result['test_classes']} classes)"
                      + (f"  train/test at {apart['locations_in_both']} shared locations, min gap"
                         f" {apart['min_gap_days']} d, median {apart['median_gap_days']} d" if apart else ""), flush=True)
    for split_by in KINDS:
        for method in args.methods:
            picked = [(top1, f1) for s, m, top1, f1 in rows if s == split_by and m == method]
            top1, f1 = np.mean(picked, axis=0)
            print(f"mean {split_by:9s} {method:6s} top1 {top1:.3f} macro-F1 {f1:.3f} over {len(picked)} split(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
