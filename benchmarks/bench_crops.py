"""Cropping speed: crops per second on real data at 1, 2 and 4 threads, both strategies.

Runs ``crop_detections`` on ../shared/data/mct (every box of mct_cct.json, 640x640
JPEGs) and ../shared/data/lila_md_test (MegaDetector v5a output, threshold 0.2,
1280x1024 to 5152x3968 JPEGs), each time into a fresh temporary folder, and prints
wall-clock crops per second (reading the input, decoding, cropping, atomic JPEG writes
with fsync, manifest). ``--max-size`` adds runs that store crops at most N pixels.

    python benchmarks/bench_crops.py [--threads 1 2 4] [--repeats 1] [--max-size 224]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from classification.data.crops import CropOptions, crop_detections

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "mct (CCT boxes)": ("mct/mct_cct.json", "mct/images"),
    "lila_md_test (MD, conf >= 0.2)": ("lila_md_test/md_v5a_output.json", "lila_md_test/images"),
}


def time_run(input_json: Path, images_dir: Path, options: CropOptions) -> tuple[int, float]:
    """Crops written and seconds taken, into a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix="bench_crops_") as crops_dir:
        started = time.perf_counter()
        report = crop_detections(input_json, Path(crops_dir), images_dir, options)
        seconds = time.perf_counter() - started
    if report.failures or report.new != report.crops_requested:
        raise SystemExit(f"benchmark run incomplete: {report.lines()}")
    return report.new, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; the fastest is reported")
    parser.add_argument("--max-size", type=int, default=None, help="also time runs with --max-size N")
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        print(f"skipped: real data not found at {SHARED_DATA}")
        return 0
    print(f"CPU cores: {os.cpu_count()}; crops per second, best of {args.repeats}")
    print(f"{'data':32s} {'strategy':8s} {'max-size':>8s} {'threads':>7s} {'crops':>6s} {'seconds':>8s} {'crops/s':>8s}")
    for name, (input_json, images_dir) in DATASETS.items():
        for strategy in ("square", "pad"):
            for max_size in [None] + ([args.max_size] if args.max_size else []):
                for threads in args.threads:
                    options = CropOptions(crop_strategy=strategy, threads=threads, max_size=max_size, progress=False)
                    runs = [time_run(SHARED_DATA / input_json, SHARED_DATA / images_dir, options) for _ in range(args.repeats)]
                    crops, seconds = min(runs, key=lambda r: r[1])
                    print(f"{name:32s} {strategy:8s} {str(max_size or '-'):>8s} {threads:7d} {crops:6d} {seconds:8.2f} {crops / seconds:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
