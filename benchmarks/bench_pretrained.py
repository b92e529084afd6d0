"""From scratch, linear probe and fine-tuning on the real MCT crops: held-out test top-1 and macro-F1.

    python benchmarks/bench_pretrained.py [--seeds 0 1 2] [--methods scratch probe mlp finetune]
        [--architecture efficientnet_lite0] [--finetune-epochs 6] [--finetune-size 224]
        [--workdir data/interim/bench_pretrained]

Cleans and square-crops ../shared/data/mct once, then for each seed makes location-disjoint
splits (60/20/20, the seed's own) and scores, on its test split:

- ``scratch``: ResNet-18 from random weights (112 px, 10 epochs, SGD, label-balanced sampler);
- ``probe``: logistic regression on the frozen ImageNet backbone's features (the packaged,
  offline weights), its L2 strength chosen on the val split;
- ``mlp``: the active-learning head (one hidden layer) on the same features;
- ``finetune``: the whole network from the packaged ImageNet weights (AdamW, head-only first
  epoch, light augmentation, label-balanced sampler), best epoch by val macro-F1.

Prints one row per method (mean ± std over seeds) and writes ``results.csv``/``results.json``
in the workdir. Re-runs reuse crops, features and finished trainings.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from classification.active_learning.embeddings import embed_samples, embed_with_checkpoint
from classification.active_learning.triplet import predict_proba, train_mlp
from classification.config import ExperimentConfig, load_config
from classification.data.clean import CleanOptions, clean_cct
from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from classification.data.dataset import DatasetOptions, create_classification_dataset
from classification.data.samples import Sample, build_samples, load_label_index
from classification.training.checkpoint import resolve_checkpoint
from classification.training.engine import train
from classification.training.metrics import accumulate_probabilities
from classification.training.models import build_model

REPO = Path(__file__).resolve().parents[1]
MCT = REPO.parent / "shared" / "data" / "mct"
METHODS = ("scratch", "probe", "mlp", "finetune")


def prepare_crops(workdir: Path) -> tuple[Path, Path]:
    """Clean and square-crop MCT once; returns (clean CCT, crops folder)."""
    clean, crops = workdir / "clean.json", workdir / "crops"
    if not clean.is_file():
        clean_cct(MCT / "mct_cct.json", clean, CleanOptions(dataset="mct"))
    crop_detections(clean, crops, MCT / "images", CropOptions(crop_strategy="square", threads=2, progress=False))
    return clean, crops


def prepare_split(workdir: Path, clean: Path, crops: Path, seed: int) -> Path:
    """The dataset with this seed's location-disjoint 60/20/20 splits."""
    dataset = workdir / f"dataset_seed{seed}"
    if not (dataset / "splits.json").is_file():
        create_classification_dataset(dataset, DatasetOptions(crops_dir=crops, cct_json=clean, val_frac=0.2,
                                                              test_frac=0.2, seed=seed))
    return dataset


def scores(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Top-1 and macro-F1 with the framework's own metric code."""
    result = accumulate_probabilities(probabilities, labels, num_classes).compute()
    return {"top1": float(result["top1"]), "macro_f1": float(result["macro_f1"])}


def labels_of(samples: list[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)


# ---------------------------------------------------------------- features of the frozen backbone


def backbone_features(workdir: Path, architecture: str, splits: dict[str, list[Sample]]) -> dict[str, np.ndarray]:
    """Penultimate features of the frozen packaged ImageNet backbone for every split's samples: one pass over
    all of them (the same crops for every seed), cached in resumable chunks."""
    config = ExperimentConfig(data_root=Path("."), architecture=architecture, pretrained_source="package",
                              batch_size=64, num_workers=2, device="cpu")
    model = build_model(architecture, 1, pretrained=True, pretrained_source="package")
    everything = sorted({str(s.path): s for samples in splits.values() for s in samples}.values(), key=lambda s: str(s.path))
    result = embed_samples(model, everything, config, torch.device("cpu"), False,
                           workdir / "features" / architecture, f"{architecture} package")
    by_path = {str(everything[i].path): row for i, row in zip(result.kept, result.embeddings)}
    return {name: np.stack([by_path[str(s.path)] for s in samples]) for name, samples in splits.items()}


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float) -> torch.nn.Linear:
    """Multinomial logistic regression with L2 (full-batch L-BFGS) on standardised features."""
    torch.manual_seed(0)
    inputs, targets = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    linear = torch.nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(inputs), targets) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def probe_scores(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int) -> dict[str, float]:
    """Logistic regression on train features; L2 chosen by val macro-F1; scored on test."""
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    norm = {k: (v - mean) / std for k, v in features.items()}
    best = None
    for l2 in (1e-4, 1e-3, 1e-2, 3e-2, 1e-1):
        linear = fit_logistic_regression(norm["train"], labels["train"], num_classes, l2)
        with torch.no_grad():
            val = scores(linear(torch.as_tensor(norm["val"])).softmax(1).double().numpy(), labels["val"], num_classes)
        if best is None or val["macro_f1"] > best[0]:
            best = (val["macro_f1"], l2, linear)
    assert best is not None
    with torch.no_grad():
        test = torch.as_tensor(norm["test"])
        return {**scores(best[2](test).softmax(1).double().numpy(), labels["test"], num_classes), "l2": best[1]}


def mlp_scores(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int, seed: int) -> dict[str, float]:
    """The active-learning MLP head (train_mlp, its defaults as the simulation uses them) on the features."""
    mlp = train_mlp(features["train"], labels["train"], num_classes, epochs=200, seed=seed)
    return scores(predict_proba(mlp, features["test"]), labels["test"], num_classes)


# ---------------------------------------------------------------- networks trained end to end


def network_config(method: str, architecture: str, epochs: int, size: int) -> dict[str, object]:
    """Training settings of the end-to-end methods."""
    if method == "scratch":
        return {"architecture": "resnet18", "pretrained": False, "image_size": 112, "num_epochs": 10, "batch_size": 32,
                "learning_rate": 0.05, "warmup_epochs": 1}
    return {"architecture": architecture, "pretrained": True, "pretrained_source": "package", "image_size": size,
            "num_epochs": epochs, "batch_size": 32, "optimizer": "adamw", "learning_rate": 0.001,
            "weight_decay": 0.05, "warmup_epochs": 1, "freeze_backbone_epochs": 1, "label_smoothing": 0.1}


def trained_scores(workdir: Path, dataset: Path, crops: Path, seed: int, method: str, settings: dict[str, object]) -> dict[str, float]:
    """Train (or reuse) a network on the train split; score its best-val checkpoint on test."""
    run_dir = workdir / "runs" / f"{method}_seed{seed}_{settings['image_size']}px_{settings['num_epochs']}ep"
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yml"
    config_file.write_text(yaml.safe_dump({
        "data_root": str(dataset), "crops_dir": str(crops), "seed": seed, "num_workers": 2, "comet": "off",
        "augmentation": "light", "balancing": "sampler", "monitor": "val_macro_f1", "log_sample_predictions": 0,
        "checkpoint_keep_last": 1, **settings}, sort_keys=False))
    config = load_config(config_file)
    train(config, run_dir, config_path=config_file)
    test = build_samples(config, "test")
    result = embed_with_checkpoint(resolve_checkpoint(run_dir, "best"), test, config, None)
    assert result.probabilities is not None
    return scores(result.probabilities, labels_of([test[i] for i in result.kept]), len(load_label_index(dataset, "train")))


# ---------------------------------------------------------------- the benchmark


def run_seed(workdir: Path, clean: Path, crops: Path, seed: int, args: argparse.Namespace) -> list[dict[str, object]]:
    """Every asked method on one seed's splits."""
    dataset = prepare_split(workdir, clean, crops, seed)
    config = ExperimentConfig(data_root=dataset, crops_dir=crops)
    splits = {name: build_samples(config, name) for name in ("train", "val", "test")}
    labels = {name: labels_of(samples) for name, samples in splits.items()}
    num_classes = len(load_label_index(dataset, "train"))
    rows: list[dict[str, object]] = []
    features = None
    for method in args.methods:
        started = time.perf_counter()
        if method in ("probe", "mlp"):
            features = features or backbone_features(workdir, args.architecture, splits)
            result = probe_scores(features, labels, num_classes) if method == "probe" else mlp_scores(features, labels, num_classes, seed)
        else:
            result = trained_scores(workdir, dataset, crops, seed, method,
                                    network_config(method, args.architecture, args.finetune_epochs, args.finetune_size))
        rows.append({"method": method, "seed": seed, **result, "seconds": round(time.perf_counter() - started, 1),
                     "train": len(splits["train"]), "test": len(splits["test"])})
        print(f"seed {seed} {method:9s} top1 {result['top1']:.3f}  macro-F1 {result['macro_f1']:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--architecture", default="efficientnet_lite0")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--finetune-size", type=int, default=224)
    parser.add_argument("--workdir", type=Path, default=REPO / "data" / "interim" / "bench_pretrained")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir = args.workdir.resolve()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(2)
    args.workdir.mkdir(parents=True, exist_ok=True)
    clean, crops = prepare_crops(args.workdir)
    rows = [row for seed in args.seeds for row in run_seed(args.workdir, clean, crops, seed, args)]
    table = pd.DataFrame(rows)
    table.to_csv(args.workdir / "results.csv", index=False)
    summary = table.groupby("method", sort=False).agg(top1_mean=("top1", "mean"), top1_std=("top1", "std"),
                                                       macro_f1_mean=("macro_f1", "mean"), macro_f1_std=("macro_f1", "std"),
                                                       seconds=("seconds", "mean"))
    (args.workdir / "results.json").write_text(json.dumps({"runs": rows, "summary": summary.reset_index().to_dict("records")},
                                                          indent=2, default=float))
    print(f"\nMCT square crops, location-disjoint 60/20/20 splits, seeds {args.seeds}, {args.architecture}")
    print(f"{'method':10s} {'test top-1':>16s} {'test macro-F1':>16s} {'s/seed':>8s}")
    for method, row in summary.iterrows():
        print(f"{method:10s} {row.top1_mean:8.3f} ± {row.top1_std:5.3f} {row.macro_f1_mean:8.3f} ± {row.macro_f1_std:5.3f} "
              f"{row.seconds:8.0f}")


if __name__ == "__main__":
    main()
