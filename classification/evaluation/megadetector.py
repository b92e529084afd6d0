"""Classifier results back into MegaDetector's batch-output format (what Timelapse and other tools load).

The output is the input MegaDetector file with two additions, as in MegaDetector's own
classification scripts: ``classification_categories`` (``{"0": "agouti", ...}``, the
model's label index) and, on every detection whose crop was classified,
``classifications: [["<class id>", prob], ...]`` (top-k, most probable first). Every
other field, and every detection that was not classified, is left as it was, but
``info.format_version``: at least 1.4, the version that defines what is added here, so that
MegaDetector's own validator (1.3 and later) reads the file.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from classification.data.dataset import read_crops_manifest
from classification.data.detections import load_megadetector
from classification.errors import DataError
from classification.evaluation.report import topk_of
from classification.io import write_json_atomic

_DETECTION_ID = re.compile(r"^det(?P<index>\d+)$")
PROBABILITY_DECIMALS = 4
# The batch-output format version that defines everything written here (classifications with
# classification_category_descriptions); MegaDetector's validator reads only 1.3 and later.
CLASSIFIED_FORMAT_VERSION = "1.4"


def version_number(version: object) -> tuple[int, ...]:
    """``"1.10"`` -> ``(1, 10)``; an unreadable version counts as 1.0."""
    parts = str(version).strip().split(".")
    return tuple(int(part) for part in parts) if all(part.isdigit() for part in parts) else (1, 0)


def classified_format_version(version: object) -> str:
    """The input's ``format_version``, raised to the version that holds classifications (a newer input keeps its own)."""
    if version is not None and version_number(version) >= version_number(CLASSIFIED_FORMAT_VERSION):
        return str(version)
    return CLASSIFIED_FORMAT_VERSION


def detection_index(annotation_id: str) -> int:
    """The detection's index in its image from the crop's annotation id (``det07`` -> 7)."""
    match = _DETECTION_ID.match(annotation_id)
    if match is None:
        raise DataError(f"crops manifest: annotation id {annotation_id!r} is not a MegaDetector detection (det<N>)")
    return int(match["index"])


def classification_categories(label_names: Sequence[str]) -> dict[str, str]:
    """``{"0": name, ...}`` in label-index order."""
    return {str(i): name for i, name in enumerate(label_names)}


def top_classifications(row: pd.Series, class_ids: dict[str, str], topk: int) -> list[list[Any]]:
    """``[["<class id>", prob], ...]`` of one prediction row, most probable first."""
    pairs = []
    for k in range(1, topk + 1):
        name = row[f"top{k}_label"]
        if name not in class_ids:
            raise DataError(f"predictions: {row['path']}: top{k}_label {name!r} is not one of the model's classes")
        pairs.append([class_ids[name], round(float(row[f"top{k}_prob"]), PROBABILITY_DECIMALS)])
    return sorted(pairs, key=lambda pair: -pair[1])


def crop_detections(manifest: pd.DataFrame) -> dict[str, tuple[str, int]]:
    """Crop path -> (MegaDetector ``file`` with ``/`` separators, detection index)."""
    return {row.crop_path: (row.file_name, detection_index(row.annotation_id))
            for row in manifest.itertuples(index=False)}


def add_classifications(
    md: dict[str, Any], predictions: pd.DataFrame, manifest: pd.DataFrame, label_names: Sequence[str], topk: int
) -> dict[str, Any]:
    """A copy of ``md`` with ``classification_categories`` and each classified detection's ``classifications``."""
    output = copy.deepcopy(md)
    images = {image["file"].replace("\\", "/"): image for image in output["images"]}
    class_ids = {name: key for key, name in classification_categories(label_names).items()}
    locate = crop_detections(manifest)
    for row in predictions.to_dict("records"):
        if row["path"] not in locate:
            raise DataError(f"predictions: {row['path']}: not in the crops manifest (crops of another MegaDetector file?)")
        file, index = locate[row["path"]]
        image = images.get(file)
        if image is None:
            raise DataError(f"crops manifest: {row['path']}: image {file!r} is not in the MegaDetector file")
        detections = image.get("detections") or []
        if index >= len(detections):
            raise DataError(f"crops manifest: {row['path']}: {file!r} has no detection {index} in the MegaDetector file")
        detections[index]["classifications"] = top_classifications(pd.Series(row), class_ids, topk)
    output["classification_categories"] = classification_categories(label_names)
    return output


def write_megadetector_classifications(
    md_json: Path,
    predictions: pd.DataFrame,
    crops_manifest: Path | pd.DataFrame,
    output_path: Path,
    topk: int = 3,
    *,
    label_names: Sequence[str],
    classifier: str | None = None,
    descriptions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``md_json`` plus the classifications of its crops to ``output_path`` (atomically); return it.

    ``predictions`` has one row per classified crop (``path`` = the crop's path in the
    manifest); ``topk`` is capped at the number of top-k columns the table has.
    ``descriptions``: MegaDetector's ``classification_category_descriptions`` (the taxonomy
    string of each category id), written when a taxonomy is known.
    """
    md = load_megadetector(Path(md_json))
    manifest = crops_manifest if isinstance(crops_manifest, pd.DataFrame) else read_crops_manifest(Path(crops_manifest))
    missing = {"file_name", "annotation_id"} - set(manifest.columns)
    if missing:
        raise DataError(f"crops manifest: missing columns {', '.join(sorted(missing))}")
    output = add_classifications(md, predictions, manifest, label_names, min(topk, topk_of(predictions)))
    info = output.setdefault("info", {})
    info["format_version"] = classified_format_version(info.get("format_version"))
    if classifier is not None:
        info["classifier"] = classifier
    if descriptions is not None:
        output["classification_category_descriptions"] = descriptions
    write_json_atomic(output_path, output)
    return output


def image_answers(md: dict[str, Any], answers: pd.DataFrame, manifest: pd.DataFrame, blank_threshold: float) -> pd.DataFrame:
    """One answer per MegaDetector image: blank, the detector's category, or the classifier's answer.

    An image without a detection at ``blank_threshold`` is ``blank``; otherwise its answer is the
    most confident kept detection's: the post-processed classifier answer where that detection
    was classified (``answers``: ``path, answer, answer_confidence`` per crop), else the detector's
    category (``person``, ``vehicle``, or ``animal`` for an animal that was not cropped).
    ``all_answers`` lists each distinct answer of the image's kept detections once.
    """
    categories = md.get("detection_categories") or {}
    locate = crop_detections(manifest)
    classified = {locate[path]: (answer, float(confidence)) for path, answer, confidence in
                  zip(answers["path"], answers["answer"], answers["answer_confidence"]) if path in locate}
    rows = []
    for image in md["images"]:
        file = image["file"].replace("\\", "/")
        kept = sorted(((float(d.get("conf", 0.0)), i, d) for i, d in enumerate(image.get("detections") or [])
                       if float(d.get("conf", 0.0)) >= blank_threshold), key=lambda item: (-item[0], item[1]))
        if not kept:
            top = max((float(d.get("conf", 0.0)) for d in image.get("detections") or []), default=0.0)
            rows.append({"file": file, "answer": "blank", "confidence": round(1.0 - top, PROBABILITY_DECIMALS),
                         "source": "detector", "n_detections": 0, "all_answers": "blank"})
            continue
        named = [classified.get((file, i), (categories.get(str(d.get("category")), "animal"), conf)) for conf, i, d in kept]
        sources = ["classifier" if (file, i) in classified else "detector" for _, i, _ in kept]
        rows.append({"file": file, "answer": named[0][0], "confidence": round(named[0][1], PROBABILITY_DECIMALS),
                     "source": sources[0], "n_detections": len(kept), "all_answers": ";".join(dict.fromkeys(n for n, _ in named))})
    return pd.DataFrame(rows, columns=["file", "answer", "confidence", "source", "n_detections", "all_answers"])
