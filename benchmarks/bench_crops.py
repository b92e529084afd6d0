"""Cropping speed: against MegaDetector's cropper, then crops per second by threads and strategy.

First, side by side in one run: MegaDetector's ``generate_crops_from_cct`` (one process,
exact boxes, Pillow's default quality 75, plain writes) against ``crop_detections``
(square crops, quality 90, atomic writes, one sync before the manifest) on every box of
../shared/data/mct, alternating the two, best of ``--repeats`` each, and the ratio. It
needs ``pip install --no-deps megadetector`` (its cropping needs only Pillow); without
it that part is skipped with a note.

Then it runs ``crop_detections`` on ../shared/data/mct (every box of mct_cct.json, 640x640
JPEGs) and ../shared/data/lila_md_test (MegaDetector v5a output, threshold 0.2,
1280x1024 to 5152x3968 JPEGs), each time into a fresh temporary folder, and prints
wall-clock crops per second (reading the input, decoding, cropping, atomic JPEG writes,
the sync, manifest). ``--max-size`` adds runs that store crops at most N pixels.
Set ``CLASSIFICATION_LIBTURBOJPEG=none`` to time the whole-image decode instead of the
crops' rectangle (``classification/data/jpeg_region.py``).

    python benchmarks/bench_crops.py [--threads 1 2 4] [--repeats 3] [--max-size 224] [--compare-only]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from classification.data import jpeg_region
from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from machine_load import describe_load

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


def time_megadetector(input_json: Path, images_dir: Path) -> tuple[int, float]:
    """Crops written and seconds taken by MegaDetector's ``generate_crops_from_cct``, into a fresh folder (muted)."""
    from megadetector.data_management.generate_crops_from_cct import generate_crops_from_cct  # noqa: PLC0415 - optional

    with tempfile.TemporaryDirectory(prefix="bench_md_crops_") as crops_dir:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            started = time.perf_counter()
            generate_crops_from_cct(str(input_json), str(images_dir), crops_dir)
            seconds = time.perf_counter() - started
        crops = sum(len(files) for _, _, files in os.walk(crops_dir))
    return crops, seconds


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the cropping worker processes)."""
    try:
        import resource  # noqa: PLC0415 - POSIX only
    except ImportError:  # not on Windows
        return math.nan
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def with_cpu_time(run: Callable[[], tuple[int, float]]) -> tuple[int, float, float]:
    """``run()``'s crops and seconds, and the CPU seconds it used (less sensitive to other load than seconds)."""
    before = cpu_seconds()
    crops, seconds = run()
    return crops, seconds, cpu_seconds() - before


def region_decoding() -> str:
    """Whether crops decode only their rectangle, and with which libturbojpeg."""
    return f"on, {jpeg_region.library_path()}" if jpeg_region.available() else "off (the whole image is decoded)"


def compare_with_megadetector(repeats: int, threads: list[int]) -> None:
    """Print MegaDetector's cropper and ours on MCT side by side: alternating runs, best of ``repeats`` each."""
    try:
        import megadetector  # noqa: F401, PLC0415 - optional
    except ImportError:
        print("MegaDetector comparison skipped: pip install --no-deps megadetector")
        return
    input_json, images_dir = SHARED_DATA / "mct" / "mct_cct.json", SHARED_DATA / "mct" / "images"
    reference = "megadetector generate_crops_from_cct"
    runners: dict[str, Callable[[], tuple[int, float]]] = {reference: lambda: time_megadetector(input_json, images_dir)}
    for n in threads:
        options = CropOptions(crop_strategy="square", threads=n, progress=False)
        runners[f"crop_detections square, {n} worker(s)"] = functools.partial(time_run, input_json, images_dir, options)
    runs: dict[str, list[tuple[int, float, float]]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            runs[name].append(with_cpu_time(run))
    best = {name: min(results, key=lambda r: r[1]) for name, results in runs.items()}
    print(f"MCT, every box of mct_cct.json; best of {repeats} alternating runs; {describe_load()}")
    print(f"region decoding (classification/data/jpeg_region.py): {region_decoding()}")
    print(f"{'cropper':40s} {'crops':>6s} {'seconds':>8s} {'crops/s':>8s} {'vs MD':>6s} {'CPU s':>6s}")
    for name, (crops, seconds, cpu) in best.items():
        print(f"{name:40s} {crops:6d} {seconds:8.2f} {crops / seconds:8.1f} {best[reference][1] / seconds:5.2f}x {cpu:6.2f}")
    print("(CPU s: CPU time of the fastest run, all its processes; wall-clock speed-up needs free cores)")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest is reported")
    parser.add_argument("--max-size", type=int, default=None, help="also time runs with --max-size N")
    parser.add_argument("--compare-only", action="store_true", help="only the comparison with MegaDetector's cropper")
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        print(f"skipped: real data not found at {SHARED_DATA}")
        return 0
    compare_with_megadetector(args.repeats, sorted({1, min(2, os.cpu_count() or 1), os.cpu_count() or 1}))
    if args.compare_only:
        return 0
    print(f"CPU cores: {os.cpu_count()}; crops per second, best of {args.repeats}; region decoding {region_decoding()}")
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
