"""``predict.py --model PACKAGE``: predict with a model package alone (onnxruntime), writing today's output files.

No training config, checkpoint or PyTorch network is involved: the classes, input spec and
post-processing come from the package (``classification.package.spec``), the network runs in
onnxruntime (``classification.package.runtime``). The outputs are those of a checkpoint's
prediction: ``predictions.csv``, ``skipped.csv``, ``prediction_info.json``, ``metrics.json`` and
plots when labels are known, ``<md>_classified.json`` for MegaDetector input, and the
post-processed answers when the package carries a ``postprocess:`` section.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from classification.config import PostprocessConfig, describe_error
from classification.data.crop_manifest import MANIFEST_NAME
from classification.errors import DataError, UserError
from classification.evaluation.megadetector import write_megadetector_classifications
from classification.evaluation.postprocess import (
    FittedPostprocess,
    PostprocessInput,
    PostprocessResult,
    is_enabled,
    megadetector_descriptions_for,
    run_postprocess,
)
from classification.evaluation.prediction_files import (
    PredictionInput,
    PredictionResult,
    cct_input,
    folder_input,
    megadetector_input,
    scores_from_probabilities,
    write_prediction_files,
)
from classification.package.runtime import DEFAULT_BATCH, load_session, network_file, score_files
from classification.package.spec import SPEC_NAME, PackageSpec, read_package

log = logging.getLogger(__name__)


def package_input(spec: PackageSpec, images_dir: Path | None, cct: Path | None, megadetector: Path | None,
                  crops_dir: Path | None) -> PredictionInput:
    """The one input asked for: an image folder, a CCT file (relative to ``crops_dir``), or MegaDetector crops."""
    given = [value for value in (images_dir, cct, megadetector) if value is not None]
    if len(given) != 1:
        raise UserError("with --model, give exactly one input among --images, --cct, --megadetector (--split needs --config)")
    if images_dir is not None:
        return folder_input(Path(images_dir).resolve(), spec.label_names)
    if crops_dir is None:
        raise UserError(f"--{'cct' if cct is not None else 'megadetector'} with --model needs --crops-dir: the folder its images are in")
    if cct is not None:
        return cct_input(Path(cct), Path(crops_dir).resolve(), spec.label_names)
    return megadetector_input(Path(megadetector), Path(crops_dir).resolve(), spec.label_names)  # type: ignore[arg-type]


def packaged_postprocess(folder: Path, spec: PackageSpec) -> tuple[PostprocessConfig, FittedPostprocess | None]:
    """The package's postprocess: section (files resolved inside it) and its fit; fitted steps off when nothing was fitted."""
    where = folder / SPEC_NAME
    section = dict(spec.postprocess or {})
    for key in ("taxonomy", "species_list"):
        if section.get(key):
            section[key] = folder / str(section[key])
    try:
        config = PostprocessConfig.model_validate(section)
        fitted = TypeAdapter(FittedPostprocess).validate_python(spec.fitted_postprocess) if spec.fitted_postprocess else None
    except ValidationError as error:
        raise DataError(f"{where}: postprocess: {describe_error(error.errors()[0])}") from None
    if fitted is None and (config.calibrate or config.abstain):
        log.warning("%s: nothing fitted on val before export: calibration and abstention are off", where)
        config = config.model_copy(update={"calibrate": False, "abstain": False})
    return config, fitted


def prediction_info(source: PredictionInput, folder: Path, spec: PackageSpec, n_predicted: int, n_skipped: int,
                    images_per_second: float, topk: int, providers: list[str], network: Path) -> dict[str, Any]:
    """``prediction_info.json`` of a package's prediction."""
    return {
        "input": source.name, "images_root": str(source.root), "model_package": str(folder), "package_name": spec.name,
        "checkpoint": (spec.provenance.get("checkpoint") or {}).get("name"), "architecture": spec.architecture,
        "image_size": spec.input.size, "runtime": "onnxruntime", "network": network.name, "providers": providers, "n_images": len(source.samples),
        "n_predicted": n_predicted, "n_skipped": n_skipped, "images_per_second": round(images_per_second, 2), "topk": topk,
        "label_names": spec.label_names,
    }


def run_package_prediction(model_dir: str | Path, images_dir: Path | None = None, cct: Path | None = None,
                           megadetector: Path | None = None, crops_dir: Path | None = None, output_dir: Path | None = None,
                           batch_size: int | None = None, topk: int = 3, threads: int | None = None,
                           precision: str = "fp32") -> PredictionResult:
    """Predict one input with a model package and write the outputs (see the module docstring)."""
    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    folder = Path(model_dir)
    spec = read_package(folder)
    if output_dir is None:
        raise UserError("--model needs --output-dir (a package has no run folder to write into)")
    output_dir = Path(output_dir)
    session = load_session(folder, spec, threads, precision=precision)
    network = network_file(folder, spec, precision)
    source = package_input(spec, images_dir, cct, megadetector, crops_dir)
    scored = score_files(session, spec, [sample.path for sample in source.samples], batch_size or DEFAULT_BATCH, threads)
    labels = np.asarray([source.samples[i].label for i in scored.indices], dtype=np.int64)
    scores = replace(scores_from_probabilities(scored.indices, scored.probabilities, labels, scored.skipped, topk,
                                               len(spec.label_names)), images_per_second=scored.images_per_second)
    log.info("predicted %d images (%.1f images/s, onnxruntime %s); %d skipped (see skipped.csv)", len(scores.indices),
             scores.images_per_second, ",".join(session.get_providers()), len(scores.skipped))
    info = prediction_info(source, folder, spec, len(scores.indices), len(scores.skipped), scores.images_per_second, topk,
                           list(session.get_providers()), network)
    predictions, skipped, predictions_path, metrics = write_prediction_files(source, scores, spec.label_names, output_dir, info)
    classifier = f"{spec.architecture} {spec.name} ({network.name})"
    config, fitted = packaged_postprocess(folder, spec)
    md_output = None
    if source.megadetector is not None:
        md_output = output_dir / f"{source.megadetector.stem}_classified.json"
        write_megadetector_classifications(source.megadetector, predictions, source.manifest, md_output, topk,
                                           label_names=spec.label_names, classifier=classifier,
                                           descriptions=megadetector_descriptions_for(config, spec.label_names))
    post: PostprocessResult | None = None
    if is_enabled(config):
        where = PostprocessInput(folder, network, fit=False,
                                 manifest=source.manifest if source.manifest is not None else source.root / MANIFEST_NAME,
                                 megadetector=source.megadetector, classifier=classifier, packaged=fitted)
        post = run_postprocess(config, spec.label_names, predictions, scored.probabilities, output_dir, where)
    return PredictionResult(output_dir, predictions_path, predictions, skipped["path"].tolist(), metrics,
                            scores.images_per_second, md_output, post)
