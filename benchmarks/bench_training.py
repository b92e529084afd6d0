"""Training and prediction throughput: the real input pipeline against in-memory tensors.

    python benchmarks/bench_training.py [--architecture resnet18] [--image-size 112] \
        [--batch-size 32] [--steps 8] [--num-workers 2] [--repeats 3] [--device auto] [--amp off|bf16|fp16] \
        [--tasks train predict] [--channels-last off on]

Crops the real MCT subset (../shared/data/mct) once into a temporary folder, builds the
classification dataset, then measures images per second for: training from the real
loader (JPEG decoding + augmentation), training on one batch already in memory (pure
compute), each with and without channels_last; and prediction from the loader and from
memory. Training runs the training loop's own step (``training/trainer.train_step``: loss,
backward, optimizer, schedule, metrics). Loader and memory runs alternate, best of
``--repeats`` each, so that load from other processes hits both alike. The ratio
loader/in-memory says how close the input pipeline lets training get to compute-bound.
``--num-workers`` takes several values to compare, or none for the network alone (the
in-memory rows: what ``channels_last: auto`` is chosen from). On a GPU machine run it with
``--device cuda --amp bf16 --num-workers 8``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from classification.config import ExperimentConfig
from classification.data.clean import CleanOptions, clean_cct
from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from classification.data.dataset import DatasetOptions, create_classification_dataset
from classification.data.samples import build_samples, load_label_index
from classification.runtime import distributed_context
from classification.training import trainer as trainer_module
from classification.training.data import Batch, build_loader, set_loader_epoch
from classification.training.metrics import MetricAccumulator
from classification.training.models import build_model, resolve_inputs
from machine_load import describe_load

MCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mct"


def prepare_dataset(workdir: Path) -> tuple[Path, Path]:
    """Clean, crop and split the MCT subset; returns (dataset folder, crops folder)."""
    clean = workdir / "clean.json"
    clean_cct(MCT / "mct_cct.json", clean, CleanOptions(dataset="mct"))
    crops = workdir / "crops"
    crop_detections(clean, crops, MCT / "images", CropOptions(crop_strategy="square", threads=2, progress=False))
    dataset = workdir / "dataset"
    create_classification_dataset(dataset, DatasetOptions(crops_dir=crops, cct_json=clean, candidates=1000))
    return dataset, crops


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Autocast context for the chosen precision (disabled when off)."""
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "off")


def time_steps(step: Callable[[torch.Tensor, torch.Tensor], None], batches: Iterator[Batch], steps: int,
               device: torch.device, channels_last: bool) -> float:
    """Images per second over ``steps`` batches, after one warm-up batch."""
    def run(batch: Batch) -> int:
        images = batch.images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        step(images, batch.labels.to(device, non_blocking=True))
        return len(batch)

    run(next(batches))
    synchronize(device)
    start, seen = time.perf_counter(), 0
    for batch in itertools.islice(batches, steps):
        seen += run(batch)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def train_step(config: ExperimentConfig, num_classes: int, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The training loop's own step on a fresh model: ``training/trainer.train_step`` with its metrics."""
    trainer = trainer_module.build_trainer(config, num_classes, [], steps_per_epoch=10_000, device=device,
                                           context=distributed_context())
    trainer.network.train()
    metrics = MetricAccumulator(num_classes)
    return lambda images, labels: trainer_module.train_step(trainer, images, labels, metrics)


def predict_step(model: nn.Module, device: torch.device, amp: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One forward pass without gradients."""
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.no_grad(), autocast(device, amp):
            model(images).softmax(dim=1)

    return step


def loader_batches(config: ExperimentConfig, train: bool) -> Iterator[Batch]:
    """Batches from the real loader, epoch after epoch."""
    loader = build_loader(resolve_inputs(config), build_samples(config, "train"), train=train)  # as the run resolves it
    for epoch in itertools.count():
        set_loader_epoch(loader, epoch)
        yield from (batch for batch in loader if len(batch))


def memory_batches(config: ExperimentConfig) -> Iterator[Batch]:
    """The same batch again and again: no decoding, no augmentation."""
    batch = next(loader_batches(config, train=True))
    return itertools.repeat(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-workers", type=int, nargs="*", default=[2],
                        help="loader workers (several to compare; none: the in-memory batch alone, e.g. for channels_last)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per input; the fastest is kept")
    parser.add_argument("--tasks", nargs="+", choices=["train", "predict"], default=["train", "predict"])
    parser.add_argument("--channels-last", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    args = parser.parse_args()
    if not MCT.is_dir():
        print(f"skipped: {MCT} not found")
        return
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        dataset, crops = prepare_dataset(Path(tmp))
        config = ExperimentConfig(data_root=dataset, crops_dir=crops, image_size=args.image_size,
                                  batch_size=args.batch_size, num_workers=0, pretrained=False,
                                  architecture=args.architecture, augmentation="light")
        num_classes = len(load_label_index(dataset))
        print(f"{args.architecture} at {args.image_size} px, batch {args.batch_size}, device {device}, amp {args.amp}, "
              f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
        print(describe_load())
        print(f"{'task':<8} {'channels_last':<14} {'input':<18} {'images/s':>9} {'ratio':>6}")
        for task in args.tasks:
            for channels_last in (mode == "on" for mode in args.channels_last):
                run_config = config.model_copy(update={"channels_last": "on" if channels_last else "off", "amp": args.amp})
                sources = ["memory"] + [f"loader, {n} workers" for n in args.num_workers]
                rates = {source: 0.0 for source in sources}
                for _ in range(args.repeats):
                    for source, workers in zip(sources, [0, *args.num_workers]):
                        source_config = run_config.model_copy(update={"num_workers": workers})
                        batches = memory_batches(source_config) if source == "memory" else loader_batches(source_config, task == "train")
                        step = make_step(task, source_config, num_classes, device, args.amp)
                        rates[source] = max(rates[source], time_steps(step, batches, args.steps, device, channels_last))
                for source in sources:
                    print(f"{task:<8} {str(channels_last):<14} {source:<18} {rates[source]:>9.1f} "
                          f"{rates[source] / rates['memory']:>6.2f}")


def make_step(task: str, config: ExperimentConfig, num_classes: int, device: torch.device,
              amp: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A fresh model's training step (the loop's own) or prediction step."""
    if task == "train":
        return train_step(config, num_classes, device)
    model = build_model(config.architecture, num_classes, pretrained=False).to(device)
    model = model.to(memory_format=torch.channels_last) if config.channels_last == "on" else model
    return predict_step(model.eval(), device, amp)


if __name__ == "__main__":
    main()
