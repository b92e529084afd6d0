"""Predicting MCT's crops on this CPU: PyTorch eager vs the model package in onnxruntime (float32, static int8).

    python benchmarks/bench_package.py [--workdir data/interim/bench_package] [--size 224] [--threads N]

Square-crops ../shared/data/mct once, makes location-disjoint splits, fine-tunes the head of
EfficientNet-Lite0 (packaged ImageNet weights) for two epochs and exports the package. Then, on the
test crops:

- end to end, start-up, decoding and resizing counted: ``predict.py --config --checkpoint`` (PyTorch
  eager, today's path) against ``predict.py --model`` (onnxruntime float32), wall time of each command;
- the network alone (batch 32, preprocessed tensors in memory): PyTorch eager, eager channels_last,
  onnxruntime float32 and onnxruntime int8 (``export.py --int8``: static QDQ, per channel, calibrated on 512 train crops),
  with the int8 model's test top-1 beside float32's;
- the machine's limit: the network's multiply-adds per image against the cores' fp32 FMA peak.

Prints a table; writes ``results.json`` in the workdir.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from classification.config import load_config
from classification.data.clean import CleanOptions, clean_cct
from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from classification.data.dataset import DatasetOptions, create_classification_dataset
from classification.evaluation.predict import load_trained_model
from classification.evaluation.prediction_files import cct_input
from classification.package.runtime import default_threads, load_session, preprocess, softmax
from classification.package.spec import read_package

ROOT = Path(__file__).resolve().parents[1]
MCT = ROOT.parent / "shared" / "data" / "mct"
BATCH = 32


def prepare(workdir: Path) -> tuple[Path, Path]:
    """Square crops and a 60/20/20 location split of MCT (reused when present)."""
    clean, crops, dataset = workdir / "clean.json", workdir / "crops", workdir / "dataset"
    if not clean.exists():
        clean_cct(MCT / "mct_cct.json", clean, CleanOptions(dataset="mct"))
    crop_detections(clean, crops, MCT / "images", CropOptions(crop_strategy="square", threads=2, progress=False))
    if not (dataset / "splits.json").exists():
        create_classification_dataset(dataset, DatasetOptions(crops_dir=crops, cct_json=clean, val_frac=0.2, test_frac=0.2,
                                                              method="random", seed=0))
    return crops, dataset


def command(*args: object) -> float:
    """Wall seconds of one entry point, as a user runs it."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *map(str, args)], check=True, cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - start


def train_and_export(workdir: Path, crops: Path, dataset: Path, size: int) -> tuple[Path, Path]:
    """A two-epoch head fine-tune of Lite0 and its package (reused when present)."""
    run_dir = workdir / "runs" / "lite0"
    config = run_dir / "config.yml"
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({
        "data_root": str(dataset), "crops_dir": str(crops), "architecture": "efficientnet_lite0", "pretrained": True,
        "pretrained_source": "package", "image_size": size, "freeze_backbone_epochs": 2, "num_epochs": 2,
        "batch_size": BATCH, "num_workers": 2, "comet": "off", "learning_rate": 0.003}))
    if not (run_dir / "checkpoints" / "2.pt").exists():
        command("classifier/train.py", "--config", config)
    package = workdir / "models" / "mct-lite0"
    if not (package / "model_int8.onnx").exists():
        command("classifier/export.py", "--config", config, "--checkpoint", "2.pt", "--output", package, "--int8", "--overwrite")
    return config, package


def per_second(function, n: int, repeats: int = 3) -> float:
    """Images per second of ``function`` (which handles ``n`` images), the best of ``repeats`` after one warm-up."""
    function()
    best = min(timed(function) for _ in range(repeats))
    return n / best


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def multiply_adds(model: torch.nn.Module, size: int) -> int:
    """Multiply-adds of one image through the network's convolutions and linear layers."""
    total = 0

    def count(module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += int(output.numel() // output.shape[0]) * kernel
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return total


def cpu_peak_gflops(threads: int) -> tuple[float, str]:
    """Nominal fp32 peak: cores x GHz x FMA lanes (AVX-512: 2 units x 16 lanes x 2 flops)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    lanes = 16 if "avx512f" in flags else 8
    ghz = (max(mhz) if mhz else 2000.0) / 1000
    return threads * ghz * 2 * lanes * 2, f"{threads} cores x {ghz:.2f} GHz x 2 FMA units x {lanes} fp32 lanes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "data" / "interim" / "bench_package")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    crops, dataset = prepare(args.workdir)
    config, package = train_and_export(args.workdir, crops, dataset, args.size)
    spec = read_package(package)
    test_cct = dataset / "test_cct.json"
    source = cct_input(test_cct, crops, spec.label_names)
    paths = [s.path for s in source.samples]
    labels = np.asarray([s.label for s in source.samples])
    results: dict[str, object] = {"images": len(paths), "size": args.size, "threads": args.threads}

    out = args.workdir / "predictions"
    results["end_to_end_s"] = {
        "pytorch_eager": command("classifier/predict.py", "--config", config, "--checkpoint", "2.pt", "--cct", test_cct,
                                 "--crops-dir", crops, "--output-dir", out / "torch"),
        "onnxruntime_fp32": command("classifier/predict.py", "--model", package, "--cct", test_cct, "--crops-dir", crops,
                                    "--output-dir", out / "onnx"),
        "onnxruntime_int8": command("classifier/predict.py", "--model", package, "--cct", test_cct, "--crops-dir", crops,
                                    "--output-dir", out / "onnx_int8", "--precision", "int8"),
    }
    pixels = np.stack([preprocess(p, spec.input) for p in paths[: 4 * BATCH]])
    batch = pixels[:BATCH]
    model = load_trained_model(config.parent / "checkpoints" / "2.pt", load_config(config)).model.eval()
    tensor = torch.from_numpy(batch)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    session = load_session(package, spec, args.threads)
    with torch.no_grad():
        eager = per_second(lambda: model(tensor), BATCH)
        last_tensor = tensor.contiguous(memory_format=torch.channels_last)
        channels_last = per_second(lambda: last(last_tensor), BATCH)
    fp32 = per_second(lambda: session.run(None, {"image": batch}), BATCH)

    int8 = load_session(package, spec, args.threads, precision="int8")
    int8_speed = per_second(lambda: int8.run(None, {"image": batch}), BATCH)
    everything = np.stack([preprocess(p, spec.input) for p in paths])
    top1 = {}
    for name, runner in (("fp32", session), ("int8", int8)):
        probabilities = np.concatenate([softmax(runner.run(None, {"image": chunk})[0]) for chunk in np.array_split(everything, 8)])
        top1[name] = float((probabilities.argmax(axis=1) == labels).mean())
    macs = multiply_adds(model, args.size)
    peak, how = cpu_peak_gflops(args.threads)
    results["network_images_per_s"] = {"pytorch_eager": eager, "pytorch_channels_last": channels_last,
                                       "onnxruntime_fp32": fp32, "onnxruntime_int8_static": int8_speed}
    results["test_top1"] = top1
    results["gmacs_per_image"] = macs / 1e9
    results["fp32_peak_gflops"] = {"value": peak, "how": how}
    results["fp32_ceiling_images_per_s"] = peak / (2 * macs / 1e9)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    n = len(paths)
    print(f"{n} MCT test crops at {args.size} px, {args.threads} threads ({os.cpu_count()} CPUs)")
    for name, seconds in results["end_to_end_s"].items():  # type: ignore[attr-defined]
        print(f"  end to end  {name:<24} {seconds:6.1f} s  {n / seconds:7.1f} images/s")
    for name, speed in results["network_images_per_s"].items():  # type: ignore[attr-defined]
        print(f"  network     {name:<24} {speed:7.1f} images/s  {1000 / speed:6.2f} ms/image")
    print(f"  test top-1: fp32 {top1['fp32']:.4f}, int8 {top1['int8']:.4f} ({100 * (top1['int8'] - top1['fp32']):+.1f} points)")
    print(f"  {macs / 1e9:.3f} GMAC/image; fp32 peak {peak:.0f} GFLOP/s ({how}): ceiling "
          f"{results['fp32_ceiling_images_per_s']:.0f} images/s")


if __name__ == "__main__":
    main()
