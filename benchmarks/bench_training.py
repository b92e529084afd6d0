"""Training and prediction throughput: the real input pipeline against in-memory tensors.

    python benchmarks/bench_training.py [--architecture resnet18] [--image-size 112] \
        [--batch-size 32] [--steps 8] [--num-workers 2] [--device auto] [--amp off|bf16|fp16]

Crops the real MCT subset (../shared/data/mct) once into a temporary folder, builds the
classification dataset, then measures images per second for: training from the real
loader (JPEG decoding + augmentation), training on one batch already in memory (pure
compute), each with and without channels_last; and prediction from the loader and from
memory. The ratio loader/in-memory says how close the input pipeline lets training get
to compute-bound. On a GPU machine run it with ``--device cuda --amp bf16``.
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
from classification.data.crops import CropOptions, crop_detections
from classification.data.dataset import DatasetOptions, create_classification_dataset
from classification.training.data import Batch, build_loader, build_samples, load_label_index, set_loader_epoch
from classification.training.models import build_model

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


def train_step(model: nn.Module, device: torch.device, amp: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One SGD step of cross-entropy training."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(device, amp):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def predict_step(model: nn.Module, device: torch.device, amp: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One forward pass without gradients."""
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.no_grad(), autocast(device, amp):
            model(images).softmax(dim=1)

    return step


def loader_batches(config: ExperimentConfig, train: bool) -> Iterator[Batch]:
    """Batches from the real loader, epoch after epoch."""
    loader = build_loader(config, build_samples(config, "train"), train=train)
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
    parser.add_argument("--num-workers", type=int, default=2)
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
                                  batch_size=args.batch_size, num_workers=args.num_workers, pretrained=False,
                                  architecture=args.architecture, augmentation="light")
        num_classes = len(load_label_index(dataset))
        print(f"{args.architecture} at {args.image_size} px, batch {args.batch_size}, {args.num_workers} workers, "
              f"device {device}, amp {args.amp}, torch threads {torch.get_num_threads()}")
        print(f"{'task':<10} {'input':<10} {'channels_last':<14} {'images/s':>9}")
        for task, make_step, train in (("train", train_step, True), ("predict", predict_step, False)):
            for channels_last in (False, True):
                rates = {}
                for source in ("loader", "memory"):
                    model = build_model(args.architecture, num_classes, pretrained=False).to(device)
                    model = model.to(memory_format=torch.channels_last) if channels_last else model
                    model.train(train)
                    batches = loader_batches(config, train) if source == "loader" else memory_batches(config)
                    rates[source] = time_steps(make_step(model, device, args.amp), batches, args.steps, device,
                                               channels_last)
                    print(f"{task:<10} {source:<10} {str(channels_last):<14} {rates[source]:>9.1f}")
                print(f"{task:<10} {'ratio':<10} {str(channels_last):<14} {rates['loader'] / rates['memory']:>9.2f}")


if __name__ == "__main__":
    main()
