"""Export a trained checkpoint as a model package: everything needed to use the model, nothing of the training run.

    python classifier/export.py --config runs/efficientnet-lite0/mct/config.yml --checkpoint best --output models/mct-lite0/

The folder holds model.onnx (dynamic batch), model.safetensors, label_index.json, classes.csv,
model.json (input spec, post-processing fit, provenance, held-out metrics) and model_card.md;
with --int8 also model_int8.onnx (static int8, ~1.5x faster on a CPU; its val top-1 beside float32's in model.json).
Predict with it alone: python classifier/predict.py --model models/mct-lite0/ --images DIR --output-dir OUT
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, bounded_int, run_main
from classification.package.export import DEFAULT_CALIBRATION_CROPS, export_package


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="runs/<model>/<experiment>/config.yml")
    parser.add_argument("--checkpoint", default="best", help="<epoch>.pt, last, best, or a checkpoint path (default: best)")
    parser.add_argument("--output", type=Path, required=True, help="the package folder to write, e.g. models/<name>/")
    parser.add_argument("--name", help="the model's name in model.json and the card (default: the folder's name)")
    parser.add_argument("--int8", action="store_true",
                        help="also write model_int8.onnx: static int8, calibrated on train crops, its val top-1 in model.json")
    parser.add_argument("--calibration-crops", type=bounded_int(1, 100_000), default=DEFAULT_CALIBRATION_CROPS,
                        help=f"train crops that calibrate the int8 network (default: {DEFAULT_CALIBRATION_CROPS})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package at --output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = export_package(args.config, args.checkpoint, args.output, overwrite=args.overwrite, name=args.name,
                            int8=args.int8, calibration_crops=args.calibration_crops)
    spec = result.spec
    print(f"model package {result.output_dir}: {spec.architecture}, {len(spec.label_names)} classes, "
          f"{spec.input.size} px input (see {result.output_dir / 'model_card.md'})")
    checked = (spec.int8 or {}).get("check")
    if checked:
        print(f"int8 network: {checked['split']} top-1 {checked['top1_int8']:.4f} against "
              f"{checked['top1_fp32']:.4f} in float32, the same class for {100 * checked['same_top1']:.1f}% of "
              f"{checked['n_images']} crops")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
