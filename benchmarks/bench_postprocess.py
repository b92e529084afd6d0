"""After prediction on MCT: raw vs sequence-averaged vs calibrated with abstention vs taxonomy roll-up.

    python benchmarks/bench_postprocess.py [--seeds 0 1 2] [--target-precision 0.9]
        [--workdir data/interim/bench_pretrained]

The classifier is ``bench_pretrained.py``'s linear probe on the frozen packaged
EfficientNet-Lite0 features (L2 chosen on val), on the same crops, splits (location-disjoint
60/20/20 per seed) and cached features. Its val and test probabilities go through
``classification.evaluation.postprocess.run_postprocess`` as ``predict.py`` would: fitted on val
(temperature, thresholds), applied to test. Prints detection- and sequence-level top-1, ECE
before/after calibration, and the coverage and accuracy of the answers; writes
``postprocess_results.json`` in the workdir.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench_pretrained import backbone_features, fit_logistic_regression, labels_of, prepare_crops, prepare_split, scores
from classification.config import ExperimentConfig, PostprocessConfig
from classification.data.samples import Sample, build_samples, load_label_index
from classification.evaluation.postprocess import PostprocessInput, run_postprocess
from classification.evaluation.report import prediction_columns

REPO = Path(__file__).resolve().parents[1]
TAXONOMY = REPO / "runs" / "efficientnet-lite0" / "mct" / "taxonomy.csv"


def probe_probabilities(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Val and test probabilities of the logistic-regression probe whose L2 is best on val (macro-F1)."""
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    norm = {k: torch.as_tensor((v - mean) / std, dtype=torch.float32) for k, v in features.items()}
    best = None
    for l2 in (1e-4, 1e-3, 1e-2, 3e-2, 1e-1):
        linear = fit_logistic_regression(norm["train"].numpy(), labels["train"], num_classes, l2)
        with torch.no_grad():
            val = linear(norm["val"]).softmax(1).double().numpy()
        f1 = scores(val, labels["val"], num_classes)["macro_f1"]
        if best is None or f1 > best[0]:
            best = (f1, linear)
    assert best is not None
    with torch.no_grad():
        return {name: best[1](norm[name]).softmax(1).double().numpy() for name in ("val", "test")}


def predictions_table(samples: list[Sample], probabilities: np.ndarray, label_names: list[str], crops: Path) -> pd.DataFrame:
    """A predictions.csv table (every class in the top-k, so the probabilities are exact)."""
    k = len(label_names)
    order = np.argsort(-probabilities, axis=1)
    names = np.asarray(label_names, dtype=object)
    table = {"path": [s.path.relative_to(crops).as_posix() for s in samples], "dataset": [s.dataset for s in samples],
             "location": [s.location for s in samples], "true_label": [label_names[s.label] for s in samples],
             "true_prob": probabilities[np.arange(len(samples)), [s.label for s in samples]],
             "pred_label": names[order[:, 0]], "confidence": probabilities.max(axis=1)}
    for j in range(k):
        table[f"top{j + 1}_label"] = names[order[:, j]]
    for j in range(k):
        table[f"top{j + 1}_prob"] = np.take_along_axis(probabilities, order[:, j:j + 1], axis=1)[:, 0]
    return pd.DataFrame(table, columns=prediction_columns(k))


SETTINGS = {
    "sequence": PostprocessConfig(sequence="mean"),
    "calibrated + abstain": PostprocessConfig(calibrate=True, abstain=True),
    "sequence + calibrated + abstain": PostprocessConfig(calibrate=True, sequence="mean", abstain=True),
    "sequence + calibrated + abstain + taxonomy": PostprocessConfig(calibrate=True, sequence="mean", abstain=True, taxonomy=TAXONOMY),
}


def run_seed(workdir: Path, clean: Path, crops: Path, seed: int, target: float) -> list[dict[str, object]]:
    """Every setting on one seed: fitted on val, applied to test."""
    dataset = prepare_split(workdir, clean, crops, seed)
    config = ExperimentConfig(data_root=dataset, crops_dir=crops)
    splits = {name: build_samples(config, name) for name in ("train", "val", "test")}
    labels = {name: labels_of(samples) for name, samples in splits.items()}
    label_names = [name for _, name in sorted(load_label_index(dataset, "train").items())]
    features = backbone_features(workdir, "efficientnet_lite0", splits)
    probabilities = probe_probabilities(features, labels, len(label_names))
    run_dir = workdir / "postprocess" / f"seed{seed}"
    checkpoint = run_dir / "checkpoints" / "probe.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(probabilities["val"].tobytes())  # stands for the model: the fit is keyed by its hash
    manifest = crops / "crops_manifest.csv"
    rows = []
    for setting, options in SETTINGS.items():
        options = options.model_copy(update={"target_precision": target})
        for split in ("val", "test"):
            table = predictions_table(splits[split], probabilities[split], label_names, crops)
            result = run_postprocess(options, label_names, table, probabilities[split], run_dir / split / setting.replace(" ", "_"),
                                     PostprocessInput(run_dir, checkpoint, fit=split == "val", manifest=manifest))
            assert result is not None and result.metrics is not None
            metrics = result.metrics
            stages = metrics["stages"]
            rows.append({"seed": seed, "setting": setting, "split": split, "raw_top1": stages["raw"]["top1"],
                         "top1": metrics["levels"]["detection"]["top1"], "sequence_top1": metrics["levels"]["sequence"]["top1"],
                         "raw_ece": stages["raw"]["ece"], "ece": list(stages.values())[-1]["ece"],
                         "temperature": (metrics["fitted"] or {}).get("temperature"),
                         "species_coverage": metrics["answers"]["species_coverage"],
                         "species_accuracy": metrics["answers"]["species_accuracy"],
                         "answered_coverage": metrics["answers"]["answered_coverage"],
                         "answered_accuracy": metrics["answers"]["answered_accuracy"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target-precision", type=float, default=0.9)
    parser.add_argument("--workdir", type=Path, default=REPO / "data" / "interim" / "bench_pretrained")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    workdir.mkdir(parents=True, exist_ok=True)
    clean, crops = prepare_crops(workdir)
    rows = [row for seed in args.seeds for row in run_seed(workdir, clean, crops, seed, args.target_precision)]
    table = pd.DataFrame(rows)
    (workdir / "postprocess_results.json").write_text(json.dumps(rows, indent=1, default=float))
    summary = table.groupby(["setting", "split"], sort=False).mean(numeric_only=True).drop(columns="seed")
    pd.set_option("display.width", 200)
    print(f"\nMCT, linear probe on frozen EfficientNet-Lite0 features, seeds {args.seeds}, target precision "
          f"{args.target_precision} (means over seeds)")
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
