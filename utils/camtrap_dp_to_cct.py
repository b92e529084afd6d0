"""Convert a Camtrap DP package (deployments, media, observations) to a CCT file for the rest of the pipeline.

    python utils/camtrap_dp_to_cct.py path/to/package data/interim/camtrap_cct.json
    python utils/camtrap_dp_to_cct.py path/to/package/datapackage.json out_cct.json --images-dir data/raw/camtrap_media

Locations come from deployments.csv (locationID, else locationName, else the deployment),
sequences from eventID, labels and boxes from observations.csv (normalised boxes become
pixels for every image whose file is in --images-dir, default: the package folder). Then:
utils/validate_cct.py, clean_cct.py, crop_detections.py (--images-dir the same folder), ...
A malformed package (a missing resource or column, a bad timestamp or box) is one line naming
the file, the row and the field, and exit code 2; so is a medium that is a symbolic link out of
the package (or of --images-dir) or no regular file (a FIFO, a folder): nothing outside is read.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from classification.cli import ArgumentParser, run_main
from classification.data.camtrap_dp import convert_package


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="the package folder, or its datapackage.json")
    parser.add_argument("output_json", type=Path, help="the CCT file to write")
    parser.add_argument("--images-dir", type=Path,
                        help="folder the media file names are relative to (default: the package folder); image sizes are read here")
    args = parser.parse_args(argv)
    report = convert_package(args.package, args.output_json, args.images_dir)
    print("\n".join(report.lines() + [f"wrote {args.output_json}"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
