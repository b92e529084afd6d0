"""GPU smoke run: the CUDA-only paths end to end, in a few minutes on one GPU.

    python benchmarks/gpu_smoke.py [--workdir DIR] [--architecture resnet18] [--epochs 3]

On generated demo data (no download): trains with ``amp: fp16``, ``ema_decay`` and
``freeze_backbone_epochs: 1``; kills the run with SIGKILL once its first checkpoint exists and
resumes it; predicts the val split; embeds the crops. Then the same training under
``torchrun --nproc_per_node 2``, resumed, then predicted: on two GPUs with NCCL, on one GPU with
both ranks sharing it (``CLASSIFICATION_SHARE_GPUS=1``: CUDA tensors over gloo). Prints one line per step
(exit code, seconds, val top-1) and exits non-zero when a step failed. Results go in
docs/benchmarks.md with the card named.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from classification.data.dataset import DatasetOptions, create_classification_dataset
from classification.demo import make_demo_dataset
from classification.runtime import SHARE_GPUS_ENV

REPO = Path(__file__).resolve().parents[1]
STEP_TIMEOUT_S = 900


def build_dataset(workdir: Path) -> Path:
    """Demo images cropped and split by the library's own pipeline."""
    cct = make_demo_dataset(workdir / "raw", 8, 4, 3, seed=0)
    dataset = workdir / "dataset"
    crop_detections(cct, dataset / "crops", workdir / "raw" / "images", CropOptions(crop_strategy="pad", progress=False))
    create_classification_dataset(dataset, DatasetOptions(crops_dir=dataset / "crops", cct_json=cct, val_frac=0.25,
                                                          test_frac=0.2, candidates=500, seed=0))
    return dataset


def write_config(run_dir: Path, dataset: Path, architecture: str, epochs: int, device: str) -> Path:
    """A config that turns on every CUDA-only option."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"data_root": str(dataset), "crops_dir": "crops", "architecture": architecture, "pretrained": False,
              "image_size": 96, "batch_size": 32, "num_epochs": epochs, "num_workers": 4, "device": device,
              "amp": "fp16", "ema_decay": 0.99, "freeze_backbone_epochs": 1, "learning_rate": 0.01, "comet": "off"}
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(name: str, command: list[str], results: list[tuple[str, int, float, str]], run_dir: Path | None = None,
        env: dict[str, str] | None = None) -> int:
    """Run one step (its whole process group killed after ``STEP_TIMEOUT_S``) and record its exit code, time and
    the run's last val top-1; a step that timed out is recorded as failed (exit -1)."""
    started = time.perf_counter()
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env,
                               start_new_session=True)
    try:
        code = process.wait(timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun's workers too, so that none is left on the GPU
        process.wait()
        code = -1
    seconds = time.perf_counter() - started
    if code != 0:
        log.seek(0)
        print(f"--- {name} failed ({'timed out' if code == -1 else f'exit {code}'}); last lines:\n"
              + "\n".join(log.read().splitlines()[-15:]), flush=True)
    results.append((name, code, seconds, last_val_top1(run_dir) if run_dir else ""))
    return code


def last_val_top1(run_dir: Path) -> str:
    """The last epoch's val top-1 from metrics.csv ('' when there is none)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return ""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return f"epoch {rows[-1]['epoch']}: val_top1 {float(rows[-1]['val_top1']):.3f}" if rows else ""


def kill_after_first_checkpoint(command: list[str], run_dir: Path, results: list[tuple[str, int, float, str]]) -> bool:
    """Start training, SIGKILL it once ``1.pt`` exists (a crash at any moment); False when ``1.pt`` never came."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = run_dir / "checkpoints" / "1.pt"
    while process.poll() is None and not first.exists() and time.perf_counter() - started < STEP_TIMEOUT_S:
        time.sleep(0.2)
    reached = first.exists()
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    note = last_val_top1(run_dir) if reached else "1.pt never written"
    results.append(("train, killed after 1.pt", process.returncode, time.perf_counter() - started, note))
    return reached and process.returncode == -signal.SIGKILL


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data and runs here (default: a temporary folder)")
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (AMP is then off)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: this script checks the GPU paths (--device cpu for a dry run)")
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    card = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else "CPU"
    print(f"{card}, torch {torch.__version__}, in {workdir}", flush=True)
    dataset = build_dataset(workdir)
    python = sys.executable
    results: list[tuple[str, int, float, str]] = []
    config = write_config(workdir / "runs" / "one_gpu", dataset, args.architecture, args.epochs, args.device)
    train = [python, "classifier/train.py", "--config", str(config)]
    killed_ok = kill_after_first_checkpoint(train, config.parent, results)
    run("train, resumed", [*train, "--resume"], results, config.parent)
    run("predict val", [python, "classifier/predict.py", "--config", str(config), "--checkpoint", "best", "--split", "val"],
        results)
    run("embed crops", [python, "classifier/embed.py", "--config", str(config), "--checkpoint", "best",
                        "--images", str(dataset / "crops"), "--output-dir", str(workdir / "embeddings")], results)
    if args.device == "cuda":
        # two ranks: on two GPUs with NCCL; on one GPU both ranks share it, CUDA tensors over gloo (NCCL refuses that)
        shared = torch.cuda.device_count() < 2
        env = {**os.environ, SHARE_GPUS_ENV: "1"} if shared else None
        ddp = write_config(workdir / "runs" / "two_ranks", dataset, args.architecture, args.epochs, args.device)
        torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "classifier/train.py", "--config", str(ddp)]
        where = "one GPU shared" if shared else "two GPUs"
        run(f"torchrun x2 ({where}), 2 ep", [*torchrun, "--set", "num_epochs=2"], results, ddp.parent, env)
        run("torchrun x2, resumed", [*torchrun, "--resume"], results, ddp.parent, env)
        run("predict val (DDP run)", [python, "classifier/predict.py", "--config", str(ddp), "--checkpoint", "best",
                                      "--split", "val"], results)
    for name, code, seconds, note in results:
        print(f"{name:28s} exit {code:4d}  {seconds:7.1f} s  {note}")
    return 0 if killed_ok and all(code == 0 for _, code, _, _ in results[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
