"""Predict with a trained checkpoint: a split, a folder of images, a CCT file, or MegaDetector crops.

    python classifier/predict.py --config runs/resnet-18/baseline/config.yml --checkpoint 200.pt --split val
    python classifier/predict.py --config ... --checkpoint best --images new_photos/
    python classifier/predict.py --config ... --checkpoint best --cct data/processed/mct/test_cct.json
    python classifier/predict.py --config ... --checkpoint last --megadetector md_output.json --crops-dir crops/
    python classifier/predict.py --model models/mct-lite0/ --images new_photos/ --output-dir out/

--model: a model package (classifier/export.py) in place of --config and --checkpoint: its ONNX
network runs in onnxruntime, with no training config or PyTorch model code involved.

--checkpoint: <epoch>.pt, last, best, or a path. --split scores exactly that split.
Outputs (default: <experiment>/predictions/<input>_<checkpoint>/): predictions.csv,
skipped.csv, prediction_info.json; with known labels metrics.json and PNG plots; with
--megadetector also <md file>_classified.json (MegaDetector format with classifications).
"""

from __future__ import annotations

import sys
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path

from classification.cli import MAX_BATCH_SIZE, ArgumentParser, add_dask_arguments, bounded_int, dask_options, run_main
from classification.errors import UserError
from classification.evaluation.prediction_files import PredictionResult
from classification.evaluation.review_page import write_review_page
from classification.package.runtime import PRECISIONS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--config", type=Path, help="runs/<model>/<experiment>/config.yml")
    model.add_argument("--model", type=Path, help="a model package folder (classifier/export.py), instead of --config and --checkpoint")
    parser.add_argument("--checkpoint", default="best", help="<epoch>.pt, last, best, or a checkpoint path")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="a split of the config's dataset: train, val or test")
    source.add_argument("--images", type=Path, help="every image under this folder (labels from class sub-folders, if named so)")
    source.add_argument("--cct", type=Path, help="the images of a CCT file, e.g. the dataset's test_cct.json (labels from it)")
    source.add_argument("--megadetector", type=Path, help="MegaDetector output whose crops are in --crops-dir")
    parser.add_argument("--crops-dir", type=Path,
                        help="--megadetector: the crops folder of utils/crop_detections.py; --cct: the folder its file names "
                             "are relative to (default: the config's crops_dir)")
    parser.add_argument("--output-dir", type=Path, help="default: <experiment>/predictions/<input>_<checkpoint>/")
    parser.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH_SIZE), help="default: the config's batch_size")
    parser.add_argument("--topk", type=bounded_int(1, 1000), default=3, help="top-k labels and probabilities per image")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="--model only: fp32 (model.onnx, the default) or int8 (model_int8.onnx of export.py --int8)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: the config's device)")
    parser.add_argument("--review-page", action="store_true",
                        help="also write review.html (classifier/review_page.py) of the answers: postprocessed.csv when the "
                             "config post-processes, else predictions.csv")
    add_dask_arguments(parser, unit="images")
    return parser


def predict(args: Namespace) -> PredictionResult:
    """A checkpoint's prediction (--config), or a model package's (--model)."""
    if args.model is None:
        if args.precision is not None:
            raise UserError("--precision needs --model: a checkpoint predicts with the config's amp setting")
        from classification.evaluation.predict import run_prediction  # noqa: PLC0415 - PyTorch only for --config

        return run_prediction(args.config, args.checkpoint, split=args.split, images_dir=args.images, cct=args.cct,
                              megadetector=args.megadetector, crops_dir=args.crops_dir, output_dir=args.output_dir,
                              batch_size=args.batch_size, topk=args.topk, device=args.device, dask=dask_options(args))
    from classification.package.predict import run_package_prediction  # noqa: PLC0415 - onnxruntime only for --model

    if args.split is not None:
        raise UserError("--split needs --config (a package has no dataset): give --images, --cct or --megadetector")
    return run_package_prediction(args.model, images_dir=args.images, cct=args.cct, megadetector=args.megadetector,
                                  crops_dir=args.crops_dir, output_dir=args.output_dir, batch_size=args.batch_size,
                                  topk=args.topk, precision=args.precision or "fp32")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = predict(args)
    print(f"{len(result.predictions)} predictions in {result.output_dir}"
          + (f" (top-1 {result.metrics['top1']:.4f})" if result.metrics else "")
          + (f"; {len(result.skipped)} unreadable images listed in skipped.csv" if result.skipped else ""))
    if args.review_page:
        table = result.postprocess.paths["table"] if result.postprocess is not None else result.predictions_path
        print(f"review page: {write_review_page(table)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
