"""Write a static HTML review page of a prediction run: sample crops per predicted class, the unknown bucket, the mistakes.

    python classifier/review_page.py --predictions runs/resnet-18/baseline/predictions/val_best/predictions.csv
    python classifier/review_page.py --predictions .../predictions.csv --embed-thumbnails --output review_portable.html

The page (default: review.html beside predictions.csv) opens from disk in any browser, no
server: images are linked by relative paths to the run's images folder (prediction_info.json)
or, with --embed-thumbnails, embedded so the file can be sent on its own. With --source-images, a
click on a crop opens its whole image with the box drawn. Rows naming a file outside the images
folder are shown without it and reported in one line; a confidence outside [0, 1] stops with one line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import MAX_SEED, ArgumentParser, bounded_int, run_main
from classification.evaluation.review_page import DEFAULT_PER_CLASS, PageOptions, write_review_page


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, required=True, help="predictions.csv written by classifier/predict.py")
    parser.add_argument("--output", type=Path, help="the HTML file to write (default: review.html beside the predictions)")
    parser.add_argument("--images-root", type=Path, help="folder the predictions' paths are relative to (default: from prediction_info.json)")
    parser.add_argument("--per-class", type=bounded_int(), default=DEFAULT_PER_CLASS, help="crops shown per class (and mistakes per true class)")
    parser.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0, help="seed of the per-class sample")
    parser.add_argument("--embed-thumbnails", action="store_true", help="embed JPEG thumbnails: one self-contained file")
    parser.add_argument("--source-images", type=Path,
                        help="the folder the crops were cut from (crop_detections.py's --images-dir): a click shows the whole image with its box")
    args = parser.parse_args(argv)
    options = PageOptions(per_class=args.per_class, seed=args.seed, embed=args.embed_thumbnails, source_images=args.source_images)
    page = write_review_page(args.predictions, args.output, args.images_root, options)
    print(f"review page: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
