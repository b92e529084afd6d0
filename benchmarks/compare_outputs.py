"""Same inputs, two commits: are crops, splits, checkpoints, predictions and the package byte-identical?

    python benchmarks/compare_outputs.py --base fa32ecf [--head HEAD] [--data demo|mct] [--workdir DIR]

Checks out ``--base`` and ``--head`` as git worktrees and runs the same pipeline with each one's
code (``PYTHONPATH`` puts the worktree's library first), in the same folder so that every path
written into an output is the same: clean the CCT, crop every detection, build the dataset and
its splits, train a tiny model two epochs (``deterministic: true``, CPU, one thread), predict the
test split, export the package. Then every output file of the two runs is compared by SHA-256;
files that hold a clock or a host by design (``run_info.json``, logs, the timings in
``metrics.csv``, ``metrics.json`` and ``prediction_info.json``, the export date in ``model.json``
and the card) are compared without those fields, and JSON fields that are null are left out (a
new optional field, empty, is not a difference). Prints one line
per differing file and exits 1 if any differ. Then the old run's checkpoint is resumed for a
third epoch once with each commit's code: the two ``3.pt`` must be identical too (an old
checkpoint resumes, and the new code continues it exactly as the old would). ``--data demo`` is
the generated demo set (seconds); ``--data mct`` is ../shared/data/mct (1,108 crops, a few minutes).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MCT = ROOT.parent / "shared" / "data" / "mct"
TINY = {"architecture": "timm:test_efficientnet", "pretrained": False, "image_size": 32, "batch_size": 8,
        "num_workers": 0, "comet": "off", "learning_rate": 0.05, "num_epochs": 2, "deterministic": True,
        "device": "cpu", "log_sample_predictions": 0,
        "channels_last": "off"}  # pinned: commits from before `auto` meant channels_last on the CPU compare alike
CLOCK_FIELDS = ("seconds", "per_second", "started", "finished", "hostname", "time", "date")  # substrings of field names
SKIPPED_NAMES = ("run_info.json",)  # a host, a start time and the interpreter's path by design
SKIPPED_SUFFIXES = (".log",)


def worktree(ref: str, where: Path) -> Path:
    """A detached checkout of ``ref`` at ``where``."""
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(where), ref], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return where


def inputs(data: str, folder: Path, code: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """(CCT file, images folder) of the chosen data, made with ``code`` for the demo."""
    if data == "mct":
        return MCT / "mct_cct.json", MCT / "images"
    subprocess.run([sys.executable, str(code / "utils" / "make_demo_data.py"), str(folder / "raw")], check=True, env=env,
                   capture_output=True, text=True)
    return folder / "raw" / "demo_cct.json", folder / "raw" / "images"


def code_env(code: Path) -> dict[str, str]:
    """The environment that runs ``code``'s library: first on ``PYTHONPATH``, one thread, no Comet key."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("COMET_")}, "PYTHONPATH": str(code),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run_step(code: Path, folder: Path, script: str, *args: object) -> None:
    """One entry point of ``code``, run in ``folder``; its error ends the comparison."""
    result = subprocess.run([sys.executable, str(code / script), *map(str, args)], env=code_env(code), cwd=folder,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{code.name}: {script} failed:\n{result.stderr[-2000:]}")


def run_pipeline(code: Path, folder: Path, data: str) -> None:
    """The pipeline with ``code``'s library and scripts, writing under ``folder``."""
    cct, images = inputs(data, folder, code, code_env(code))

    def step(script: str, *args: object) -> None:
        run_step(code, folder, script, *args)

    step("utils/clean_cct.py", cct, folder / "clean.json", "--missing-locations", "sequence", "--dataset", data)
    step("utils/crop_detections.py", folder / "clean.json", folder / "crops", "--images-dir", images, "--crop-strategy",
         "square", "--threads", "2", "--max-size", "64")
    step("utils/create_classification_dataset.py", folder / "dataset", "--mode", "csv", "cct", "splits", "--crops-dir",
         folder / "crops", "--cct-json", folder / "clean.json", "--val-frac", "0.2", "--test-frac", "0.2", "--seed", "0")
    run_dir = folder / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yml").write_text(yaml.safe_dump({"data_root": str(folder / "dataset"),
                                                         "crops_dir": str(folder / "crops"), **TINY}))
    step("classifier/train.py", "--config", run_dir / "config.yml")
    step("classifier/predict.py", "--config", run_dir / "config.yml", "--checkpoint", "last", "--split", "test")
    step("classifier/export.py", "--config", run_dir / "config.yml", "--checkpoint", "last", "--output", folder / "package")


ISO_TIME = re.compile(rb"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:\d{2}|Z)?")


def without_clock_json(data: bytes) -> bytes:
    """A JSON document without the fields that hold a clock or a host and without null fields, re-serialised canonically."""
    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if v is not None and not any(part in k for part in CLOCK_FIELDS)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return json.dumps(strip(json.loads(data)), sort_keys=True).encode()


def without_clock_csv(data: bytes) -> bytes:
    """A CSV table with its clock columns removed."""
    rows = list(csv.reader(io.StringIO(data.decode())))
    if not rows:
        return data
    keep = [i for i, name in enumerate(rows[0]) if not any(part in name for part in CLOCK_FIELDS)]
    return "\n".join(",".join(row[i] for i in keep if i < len(row)) for row in rows).encode()


def comparable(path: Path) -> bytes:
    """The bytes two runs must share: the file, less its clock fields where it has some."""
    data = path.read_bytes()
    normalise: dict[str, Callable[[bytes], bytes]] = {
        "metrics.csv": without_clock_csv, "metrics.json": without_clock_json, "prediction_info.json": without_clock_json,
        "model.json": without_clock_json, "model_card.md": lambda text: ISO_TIME.sub(b"<time>", text)}
    return normalise[path.name](data) if path.name in normalise else data


def output_files(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of what may be compared, for every file under ``folder``."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in SKIPPED_NAMES and path.suffix not in SKIPPED_SUFFIXES:
            found[str(path.relative_to(folder))] = hashlib.sha256(comparable(path)).hexdigest()
    return found


def resumed_third_epoch(code: Path, outputs: Path, folder: Path) -> str:
    """SHA-256 of ``3.pt`` after ``code`` resumes the two-epoch run in ``outputs`` (copied to ``folder``, its own path)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(outputs, folder)
    run_step(code, folder, "classifier/train.py", "--config", folder / "runs" / "tiny" / "config.yml", "--set", "num_epochs=3")
    digest = hashlib.sha256((folder / "runs" / "tiny" / "checkpoints" / "3.pt").read_bytes()).hexdigest()
    shutil.rmtree(folder)
    return digest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare against, e.g. main's")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--data", choices=("demo", "mct"), default="demo")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed afterwards")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="compare-outputs-"))
    runs: dict[str, dict[str, str]] = {}
    try:
        for name, ref in (("base", args.base), ("head", args.head)):
            code = worktree(ref, workdir / f"code-{name}")
            folder = workdir / "run"  # the same path for both: outputs that record paths agree
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            run_pipeline(code, folder, args.data)
            runs[name] = output_files(folder)
            shutil.move(folder, workdir / f"out-{name}")
        resumed = {name: resumed_third_epoch(workdir / f"code-{name}", workdir / "out-base", workdir / "run")
                   for name in ("base", "head")}
    finally:
        for name in ("base", "head"):
            subprocess.run(["git", "worktree", "remove", "--force", str(workdir / f"code-{name}")], cwd=ROOT, capture_output=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    base, head = runs["base"], runs["head"]
    differing = sorted(name for name in set(base) | set(head) if base.get(name) != head.get(name))
    print(f"{args.data}: {len(base)} files from {args.base}, {len(head)} from {args.head}; {len(differing)} differ")
    for name in differing:
        state = "only in base" if name not in head else "only in head" if name not in base else "different bytes"
        print(f"  {state:<16} {name}")
    same_resume = resumed["base"] == resumed["head"]
    print(f"the base run's last.pt resumed to epoch 3: {'identical' if same_resume else 'DIFFERENT'} 3.pt with "
          f"{args.base} and {args.head}")
    return 1 if differing or not same_resume else 0


if __name__ == "__main__":
    sys.exit(main())
