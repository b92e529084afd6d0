"""Write a prediction run's predictions.csv as a Camtrap DP 1.0.2 package (machine observations), validated offline.

    python classifier/predictions_to_camtrap_dp.py --predictions runs/.../predictions/test_best/predictions.csv \
        --package path/to/source_package --output-dir runs/.../predictions/test_best/camtrap_dp

--package is the Camtrap DP package the images came from (utils/camtrap_dp_to_cct.py): its
deployments and media are kept, and each prediction becomes a media-level observation of its
medium (crops are matched through the crops manifest of the run's images folder, or
--crops-manifest), plus event-level observations per event. classifiedBy defaults to the
model and run (prediction_info.json). The package is validated before it is moved into
--output-dir: exit code 2, and nothing at --output-dir, when an input is wrong or the package
would not be valid Camtrap DP (the first problem is printed). A package already at --output-dir
is replaced only with --overwrite.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.evaluation.camtrap_dp import export_predictions


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, required=True, help="predictions.csv written by classifier/predict.py")
    parser.add_argument("--package", type=Path, required=True, help="the source Camtrap DP package (folder or datapackage.json)")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="folder to write the new package into (new or empty; --overwrite to replace a package there)")
    parser.add_argument("--classified-by", help="classifiedBy of every observation (default: '<architecture> <run>/<checkpoint>')")
    parser.add_argument("--crops-manifest", type=Path, help="crops_manifest.csv mapping crops to media (default: the run's images folder)")
    parser.add_argument("--images-dir", type=Path, help="folder of the media files, to read image sizes (default: the package folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace a Camtrap DP package already at --output-dir")
    args = parser.parse_args(argv)
    report = export_predictions(args.predictions, args.package, args.output_dir, classified_by=args.classified_by,
                                crops_manifest=args.crops_manifest, images_dir=args.images_dir, overwrite=args.overwrite)
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
