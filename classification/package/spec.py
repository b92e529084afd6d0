"""What a model package holds (``model.json``) and how it is read back: no PyTorch, no training config.

A package is one folder (``classifier/export.py``)::

    model.onnx           the network, dynamic batch, float32 logits
    model_int8.onnx      the same network quantized to int8 (static QDQ), with ``export.py --int8``
    model.safetensors    the same weights as a PyTorch state dict (for fine-tuning elsewhere)
    label_index.json     {"0": "agouti", ...}, the network's output order
    classes.csv          id,class: the class list in the same order, for tools that load ONNX + a class file
    model.json           this module's ``PackageSpec``: input, files and their SHA-256, provenance, metrics
    model_card.md        the same facts for a person
    taxonomy.csv, species_list.csv   when the run's post-processing names them

``read_package`` refuses, in one line naming the file, a folder that is not a package, files whose
hashes differ from model.json, and class lists that disagree.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from classification.config import describe_error
from classification.errors import DataError
from classification.io import read_json, read_json_object

PACKAGE_FORMAT = "camtrap-classifier-package"
PACKAGE_FORMAT_VERSION = 1
SPEC_NAME = "model.json"
ONNX_NAME = "model.onnx"
WEIGHTS_NAME = "model.safetensors"
LABEL_INDEX_NAME = "label_index.json"
CLASSES_NAME = "classes.csv"
CARD_NAME = "model_card.md"


class InputSpecModel(BaseModel):
    """How an image becomes the network's input: decode RGB, resize to ``size`` x ``size``, scale to [0, 1], normalise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(gt=0, le=4096)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic", "nearest"]
    layout: Literal["NCHW"] = "NCHW"
    crop_strategy: str | None = None  # how the training crops were made (utils/crop_detections.py --crop-strategy)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        """A zero or negative std divides by zero or flips the image."""
        if not all(v > 0 for v in value):
            raise ValueError("every std must be positive")
        return value


class PackagedFile(BaseModel):
    """One file of the package and its SHA-256 (checked when the package is read)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PackageSpec(BaseModel):
    """``model.json``: everything a runtime needs besides the files, and where the model came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["camtrap-classifier-package"]
    format_version: Literal[1]
    name: str
    architecture: str
    label_names: list[str] = Field(min_length=1)
    input: InputSpecModel
    onnx: PackagedFile
    onnx_opset: int
    onnx_input: str
    onnx_output: str
    weights: PackagedFile
    onnx_int8: PackagedFile | None = None  # the int8 network (export.py --int8), run with predict.py --precision int8
    int8: dict[str, Any] | None = None  # its calibration and what it costs on val (top-1 of both, share of equal top-1)
    files: list[PackagedFile]  # the other files (label index, classes, taxonomy, ...)
    postprocess: dict[str, Any] | None = None  # the run's postprocess: section, paths relative to the package
    fitted_postprocess: dict[str, Any] | None = None  # temperature and thresholds, with the checkpoint hash they were fitted on
    provenance: dict[str, Any]  # checkpoint, config hash, data, pretrained weights, versions, date
    metrics: dict[str, Any] | None = None  # held-out metrics of the run's own predictions

    @field_validator("label_names")
    @classmethod
    def _unique_names(cls, value: list[str]) -> list[str]:
        """Two outputs with one name would be indistinguishable."""
        if len(set(value)) != len(value):
            raise ValueError("class names must be unique")
        return value


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def packaged_file(folder: Path, name: str) -> PackagedFile:
    """The entry of ``folder/name`` for model.json."""
    return PackagedFile(name=name, sha256=file_sha256(folder / name))


def read_spec(folder: Path) -> PackageSpec:
    """``folder/model.json`` as a ``PackageSpec``; one line when the folder is not a package."""
    path = Path(folder) / SPEC_NAME
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: not a model package (no such folder; make one with classifier/export.py)")
    if not path.is_file():
        raise DataError(f"{folder}: not a model package ({SPEC_NAME} missing; make one with classifier/export.py)")
    data = read_json_object(path)
    if data.get("format") != PACKAGE_FORMAT:
        raise DataError(f"{path}: format {str(data.get('format'))[:60]!r} is not {PACKAGE_FORMAT!r} (not a model package)")
    try:
        return PackageSpec.model_validate(data)
    except ValidationError as error:
        raise DataError(f"{path}: {describe_error(error.errors()[0])}") from None


def check_file(folder: Path, entry: PackagedFile) -> Path:
    """The path of a listed file after checking it exists inside the package and has its recorded hash."""
    path = Path(folder) / entry.name
    if Path(entry.name).is_absolute() or ".." in Path(entry.name).parts or not path.resolve().is_relative_to(Path(folder).resolve()):
        raise DataError(f"{Path(folder) / SPEC_NAME}: file {entry.name[:80]!r} is not inside the package")
    if not path.is_file():
        raise DataError(f"{path}: missing from the model package")
    if file_sha256(path) != entry.sha256:
        raise DataError(f"{path}: its SHA-256 differs from {SPEC_NAME} (the file was changed or replaced): export the package again")
    return path


def check_label_index(folder: Path, spec: PackageSpec) -> None:
    """``label_index.json`` must list ``spec.label_names`` in order."""
    path = Path(folder) / LABEL_INDEX_NAME
    index = read_json(path)
    expected = {str(i): name for i, name in enumerate(spec.label_names)}
    if index != expected:
        raise DataError(f"{path}: classes differ from {SPEC_NAME}'s label_names ({len(spec.label_names)} classes)")


def read_package(folder: str | Path) -> PackageSpec:
    """Read and check a model package: its spec, every file's hash, the class lists."""
    folder = Path(folder)
    spec = read_spec(folder)
    for entry in (spec.onnx, spec.weights, *([spec.onnx_int8] if spec.onnx_int8 else []), *spec.files):
        check_file(folder, entry)
    if not any(entry.name == LABEL_INDEX_NAME for entry in spec.files):
        raise DataError(f"{folder / SPEC_NAME}: lists no {LABEL_INDEX_NAME}")
    check_label_index(folder, spec)
    return spec
