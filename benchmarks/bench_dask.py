"""Cropping and prediction on Dask: images per second with 1, 2 and 4 worker processes of a local cluster, beside one process.

``crops``: every box of ../shared/data/mct (640x640 JPEGs, one box each), repeated ``--copies``
times (the images folder linked under ``copy<k>/`` names, so each copy is decoded and cropped
again), cropped by ``crop_detections`` into a fresh temporary folder each run.

``predict``: the first ``--predict-images`` MCT crops through the sharded inference path that ``classifier/predict.py`` and
the embedding step use (``run_inference_shards``; one process: ``run_inference``): softmax
probabilities of a ResNet-18 (seeded random weights: the speed is the same as trained ones)
at 112 px, batches of 32, shards of 4 batches, one torch thread per process.

The clusters are started (and their workers import the stages) before the clock starts; that
start-up time is printed apart (paid once per command, not per image). The rows alternate,
round after round, and each keeps its best. This machine has 2 cores shared with other jobs:
more than 2 workers cannot go faster here, and the load line says how busy the cores were.

    python benchmarks/bench_dask.py [--stages crops predict] [--workers 1 2 4] [--copies 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from distributed import Client, LocalCluster
from torch import nn

from bench_crops import time_run
from classification.config import ExperimentConfig
from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from classification.data.samples import Sample
from classification.shards import DaskOptions
from classification.training.data import build_loader
from classification.training.inference import PROBABILITIES, inference_options, probabilities, run_inference
from classification.training.inference_shards import ModelSource, run_inference_shards
from classification.training.models import build_model, resolve_inputs
from machine_load import describe_load

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
Run = Callable[[DaskOptions | None], tuple[int, float]]  # one timed run: (images done, seconds); None: no Dask


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


def crop_run(cct: Path, images_dir: Path) -> Run:
    """A timed cropping run into a fresh temporary folder."""
    def run(dask: DaskOptions | None) -> tuple[int, float]:
        return time_run(cct, images_dir, CropOptions(progress=False, dask=dask or DaskOptions()))
    return run


def seeded_resnet18(num_classes: int) -> nn.Module:
    """ResNet-18 with seeded random weights: the same network in every process."""
    torch.manual_seed(0)
    return build_model("resnet18", num_classes, pretrained=False)


def predict_run(crops_dir: Path, n_images: int) -> Run:
    """A timed pass of softmax probabilities over the first ``n_images`` crops; shard files in a fresh temporary folder."""
    samples = [Sample(path, 0, "", "") for path in sorted(crops_dir.rglob("*.jpg"))[:n_images]]
    config = resolve_inputs(ExperimentConfig(data_root=Path("."), architecture="resnet18", image_size=112, batch_size=32, num_workers=0,
                                             device="cpu"))  # the weights' statistics, as a run resolves them
    source = ModelSource(seeded_resnet18, (20,), "resnet18 seed 0")

    def run(dask: DaskOptions | None) -> tuple[int, float]:
        started = time.perf_counter()
        if dask is None:
            result = run_inference(seeded_resnet18(20), build_loader(config, samples, train=False), probabilities, (PROBABILITIES,),
                                   inference_options(config, torch.device("cpu")))
        else:
            with tempfile.TemporaryDirectory(prefix="bench_dask_shards_") as folder:
                result = run_inference_shards(source, samples, config, probabilities, (PROBABILITIES,), Path(folder), dask, 128)
        return len(result), time.perf_counter() - started
    return run


def start_cluster(stack: contextlib.ExitStack, workers: int) -> tuple[str, float]:
    """A local cluster of ``workers`` single-threaded processes that have imported the stages: its address and start-up seconds."""
    started = time.perf_counter()
    cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=logging.ERROR))
    with Client(cluster) as client:
        for module in ("classification.data.crop_run", "classification.training.inference_shards"):
            client.run(importlib.import_module, module)  # each worker's imports, once
    return cluster.scheduler_address, time.perf_counter() - started


def table(title: str, unit: str, run: Run, clusters: dict[int, tuple[str, float]], repeats: int) -> None:
    """Alternate one process and each cluster ``repeats`` times; print the best of each."""
    rows: dict[str, tuple[DaskOptions | None, float | None]] = {"1 process (no Dask)": (None, None)}
    rows.update({f"Dask, {n} worker process(es)": (DaskOptions(scheduler=address), start) for n, (address, start) in clusters.items()})
    best: dict[str, tuple[int, float]] = {}
    for _ in range(repeats):  # alternate the rows, so that load from other jobs falls on all of them
        for name, (dask, _) in rows.items():
            done, seconds = run(dask)
            best[name] = min(best.get(name, (done, seconds)), (done, seconds), key=lambda result: result[1])
    print(f"\n{title}, best of {repeats} alternating rounds")
    print(f"{'run':<32} {unit:>7} {'seconds':>8} {unit + '/s':>9} {'vs 1':>7} {'start s':>8}")
    single = best["1 process (no Dask)"][1]
    for name, (_, start) in rows.items():
        done, seconds = best[name]
        print(f"{name:<32} {done:>7} {seconds:>8.2f} {done / seconds:>9.1f} {single / seconds:>6.2f}x "
              f"{'-' if start is None else f'{start:.1f}':>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=("crops", "predict"), default=["crops", "predict"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="Dask worker processes to try")
    parser.add_argument("--copies", type=int, default=4, help="times every MCT box is cropped")
    parser.add_argument("--predict-images", type=int, default=512, help="crops predicted per run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every row once, the best is kept")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # one torch thread in every worker process (they inherit it) ...
    torch.set_num_threads(1)  # ... and in this one
    print(describe_load())
    with tempfile.TemporaryDirectory(prefix="bench_dask_input_") as folder, contextlib.ExitStack() as stack:
        cct, images_dir = repeated_mct(Path(folder), args.copies)
        clusters = {workers: start_cluster(stack, workers) for workers in args.workers}
        if "crops" in args.stages:
            table(f"Cropping: MCT x{args.copies}, square crops, shards of 100 images", "crops", crop_run(cct, images_dir),
                  clusters, args.repeats)
        if "predict" in args.stages:
            crops_dir = Path(folder) / "crops"
            crop_detections(SHARED_DATA / "mct" / "mct_cct.json", crops_dir, SHARED_DATA / "mct" / "images", CropOptions(progress=False))
            table(f"Prediction: {args.predict_images} MCT crops, ResNet-18 at 112 px, batches of 32, shards of 128", "images",
                  predict_run(crops_dir, args.predict_images), clusters, args.repeats)


if __name__ == "__main__":
    main()
