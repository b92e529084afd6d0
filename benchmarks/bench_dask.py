"""Cropping on Dask: crops per second with 1, 2 and 4 worker processes of a local cluster, beside one process.

Every box of ../shared/data/mct (640x640 JPEGs, one box each), repeated ``--copies`` times
(the images folder linked under ``copy<k>/`` names, so each copy is decoded and cropped
again) so that a run lasts long enough to measure. Each run crops into a fresh temporary
folder. The clusters are started (and their workers import the cropper) before the clock
starts; that start-up time is printed apart (paid once per command, not per image). The rows
alternate, round after round, and each keeps its best. The single-process row is
``crop_detections`` without Dask (``--threads 1``). This machine has 2 cores shared with
other jobs: more than 2 workers cannot go faster here, and the load line says how busy
the cores were before the run.

    python benchmarks/bench_dask.py [--workers 1 2 4] [--copies 4] [--shard-size 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from classification.data.crops import CropOptions, crop_detections
from classification.shards import DaskOptions
from machine_load import describe_load

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def repeated_mct(folder: Path, copies: int) -> tuple[Path, Path]:
    """A CCT of every MCT box ``copies`` times over, and the images folder it refers to (links to MCT's)."""
    cct = json.loads((SHARED_DATA / "mct" / "mct_cct.json").read_text())
    images_dir = folder / "images"
    images_dir.mkdir()
    out: dict[str, list[dict[str, object]]] = {"images": [], "annotations": []}
    for k in range(copies):
        (images_dir / f"copy{k}").symlink_to(SHARED_DATA / "mct" / "images")
        out["images"] += [{**im, "id": f"{k}/{im['id']}", "file_name": f"copy{k}/{im['file_name']}"} for im in cct["images"]]
        out["annotations"] += [{**a, "id": f"{k}_{a['id']}", "image_id": f"{k}/{a['image_id']}"}
                               for a in cct["annotations"] if a.get("bbox")]
    path = folder / "repeated_cct.json"
    path.write_text(json.dumps({**cct, **out}), encoding="utf-8")
    return path, images_dir


def time_run(cct: Path, images_dir: Path, options: CropOptions) -> tuple[int, float]:
    """Crops written and seconds taken, into a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix="bench_dask_") as crops_dir:
        started = time.perf_counter()
        report = crop_detections(cct, Path(crops_dir), images_dir, options)
        seconds = time.perf_counter() - started
    if report.failures or report.new != report.crops_requested:
        raise SystemExit(f"benchmark run incomplete: {report.lines()}")
    return report.new, seconds


def start_cluster(stack: contextlib.ExitStack, workers: int) -> tuple[str, float]:
    """A local cluster of ``workers`` single-threaded processes that have imported the cropper: its address and start-up seconds."""
    started = time.perf_counter()
    cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=logging.ERROR))
    with Client(cluster) as client:
        client.run(importlib.import_module, "classification.data.crops")  # each worker's imports, once
    return cluster.scheduler_address, time.perf_counter() - started


def row(name: str, crops: int, seconds: float, baseline: float, start_s: float | None) -> str:
    """One line of the table."""
    start = "-" if start_s is None else f"{start_s:.1f}"
    return f"{name:<32} {crops:>6} {seconds:>8.2f} {crops / seconds:>8.1f} {baseline / seconds:>6.2f}x {start:>8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="Dask worker processes to try")
    parser.add_argument("--copies", type=int, default=4, help="times every MCT box is cropped")
    parser.add_argument("--shard-size", type=int, default=100, help="images per shard")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every row once, the best is kept")
    args = parser.parse_args()
    print(describe_load())
    with tempfile.TemporaryDirectory(prefix="bench_dask_input_") as folder, contextlib.ExitStack() as stack:
        cct, images_dir = repeated_mct(Path(folder), args.copies)
        runs = {"1 process (no Dask)": (CropOptions(progress=False), None)}
        for workers in args.workers:
            address, start_s = start_cluster(stack, workers)
            dask = DaskOptions(scheduler=address, shard_size=args.shard_size)
            runs[f"Dask, {workers} worker process(es)"] = (CropOptions(progress=False, dask=dask), start_s)
        best: dict[str, tuple[int, float]] = {}
        for _ in range(args.repeats):  # alternate the rows, so that load from other jobs falls on all of them
            for name, (options, _) in runs.items():
                crops, seconds = time_run(cct, images_dir, options)
                best[name] = min(best.get(name, (crops, seconds)), (crops, seconds), key=lambda run: run[1])
        print(f"MCT x{args.copies}, square crops, shards of {args.shard_size} images, best of {args.repeats} alternating rounds")
        print(f"{'run':<32} {'crops':>6} {'seconds':>8} {'crops/s':>8} {'vs 1':>7} {'start s':>8}")
        single = best["1 process (no Dask)"][1]
        for name, (_, start_s) in runs.items():
            print(row(name, *best[name], single, start_s))


if __name__ == "__main__":
    main()
