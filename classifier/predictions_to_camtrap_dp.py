"""Write a prediction run's predictions.csv as a Camtrap DP 1.0.2 package (machine observations), validated offline.

    python classifier/predictions_to_camtrap_dp.py --predictions runs/.../predictions/test_best/predictions.csv \
        --package path/to/source_package --output-dir runs/.../predictions/test_best/camtrap_dp

--package is the Camtrap DP package the images came from (utils/camtrap_dp_to_cct.py): its
deployments and media are kept, and each prediction becomes a media-level observation of its
medium (crops are matched through the crops manifest of the run's images folder, or
--crops-manifest), plus event-level observations per event. classifiedBy defaults to the
model and run (prediction_info.json). Exit code 2 when an input is wrong or the package
written is not valid Camtrap DP (the first problem is printed).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.errors import DataError
from classification.evaluation.camtrap_dp import export_predictions


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, required=True, help="predictions.csv written by classifier/predict.py")
    parser.add_argument("--package", type=Path, required=True, help="the source Camtrap DP package (folder or datapackage.json)")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder to write the new package into")
    parser.add_argument("--classified-by", help="classifiedBy of every observation (default: '<architecture> <run>/<checkpoint>')")
    parser.add_argument("--crops-manifest", type=Path, help="crops_manifest.csv mapping crops to media (default: the run's images folder)")
    parser.add_argument("--images-dir", type=Path, help="folder of the media files, to read image sizes (default: the package folder)")
    args = parser.parse_args(argv)
    report = export_predictions(args.predictions, args.package, args.output_dir, classified_by=args.classified_by,
                                crops_manifest=args.crops_manifest, images_dir=args.images_dir)
    print("\n".join(report.lines()))
    if report.problems:
        raise DataError(f"{args.output_dir}: not valid Camtrap DP 1.0.2: {report.problems[0]}"
                        + (f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
