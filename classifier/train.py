"""Train the classifier of one experiment folder, from its config.yml.

    python classifier/train.py --config runs/resnet-18/baseline/config.yml [--resume | --no-resume]
        [--overwrite] [--force] [--set learning_rate=0.001 --set num_epochs=60]

--resume (the default) continues from checkpoints/last.pt, exactly where it stopped;
a changed config is refused unless --force. --no-resume refuses to start over an
earlier run unless --overwrite, which moves it to archive/<UTC time>/ (nothing is
deleted). Ctrl-C or SIGTERM saves a resumable checkpoint and exits with 130 or 143.
Multi-GPU or multi-process: torchrun --nproc_per_node N classifier/train.py --config ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.config import load_config
from classification.training.engine import train


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="runs/<model>/<experiment>/config.yml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="resume", action="store_true", default=True,
                      help="continue from checkpoints/last.pt when it exists (the default)")
    mode.add_argument("--no-resume", dest="resume", action="store_false",
                      help="start from scratch (refused over an earlier run without --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --no-resume: move the earlier run's checkpoints and metrics to archive/<time>/")
    parser.add_argument("--force", action="store_true", help="resume even though the config's training settings changed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable; recorded in run_info.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    config = load_config(args.config, args.overrides)
    result = train(config, args.config.resolve().parent, resume=args.resume, overwrite=args.overwrite,
                   force=args.force, argv=command, overrides=args.overrides, config_path=args.config)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(run_main(main))
