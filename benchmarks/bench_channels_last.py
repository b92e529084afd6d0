"""channels_last on this machine's device: the network alone, training step and inference, with and without.

    python benchmarks/bench_channels_last.py [--device cpu] [--threads N] [--rounds 5] \
        [--models resnet18:112 resnet18:224 efficientnet_lite0:224 resnet50:224]

For each ``architecture:size``: the library's model (``training.models.build_model``, random
weights: speed does not depend on them), one in-memory batch; training is forward, cross-entropy,
backward and an SGD step; inference is a forward under ``torch.inference_mode``. The two memory
formats alternate for ``--rounds`` rounds (so load from other processes hits both alike) and the
median of each is kept. This is what ``channels_last: auto`` is chosen from
(``runtime.uses_channels_last``); docs/benchmarks.md holds the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from classification.training.models import build_model

CLASSES = 10


def seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def runners(architecture: str, size: int, batch: int, device: torch.device, channels_last: bool) -> dict[str, Callable[[], object]]:
    """A training step and an inference pass of ``architecture`` at ``size`` px in the chosen memory format."""
    model = build_model(architecture, CLASSES, pretrained=False).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_function = nn.CrossEntropyLoss()

    def train_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_function(model(images), labels).backward()
        optimizer.step()

    def predict() -> None:
        model.eval()
        with torch.inference_mode():
            model(images)

    return {"train": train_step, "predict": predict}


def measure(architecture: str, size: int, batch: int, device: torch.device, rounds: int) -> dict[tuple[str, bool], float]:
    """Median images/s per (task, channels_last), the formats alternating round by round after a warm-up."""
    built = {last: runners(architecture, size, batch, device, last) for last in (False, True)}
    for tasks in built.values():
        for run in tasks.values():
            run()  # warm-up: allocator, oneDNN primitives
    times: dict[tuple[str, bool], list[float]] = {(task, last): [] for task in ("train", "predict") for last in (False, True)}
    for _ in range(rounds):
        for last, tasks in built.items():
            for task, run in tasks.items():
                times[(task, last)].append(seconds(run))
                if device.type == "cuda":
                    torch.cuda.synchronize()
    return {key: batch / statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["resnet18:112", "resnet18:224", "efficientnet_lite0:224", "resnet50:224"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {args.threads} threads, batch {args.batch_size}, median of {args.rounds} alternating rounds")
    print(f"{'model':<26}{'task':<9}{'contiguous':>12}{'channels_last':>15}{'ratio':>8}")
    for spec in args.models:
        architecture, size = spec.rsplit(":", 1)
        speed = measure(architecture, int(size), args.batch_size, device, args.rounds)
        for task in ("train", "predict"):
            plain, last = speed[(task, False)], speed[(task, True)]
            print(f"{spec:<26}{task:<9}{plain:>10.1f}/s{last:>13.1f}/s{last / plain:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
