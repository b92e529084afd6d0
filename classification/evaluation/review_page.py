"""A static HTML review page of one prediction run: what the model said, class by class, for a person to check.

``write_review_page`` reads a ``predictions.csv``, or the ``postprocessed.csv`` of the post-prediction
stage (then the final answer is shown: a class, a taxon it rolled up to, or unknown), with
``prediction_info.json`` beside it for the images folder (the crops manifest there gives each
crop's sequence when the table has none), and writes one HTML
file that opens from disk with no server: a summary table, then per predicted class a seeded
sample of crops with the predicted label, confidence, true label (when known), sequence and
location; the "unknown" bucket (a classifier that abstains predicts ``unknown``); and the
mistakes, most confident first, by true class. Images are linked by relative paths (the page
works while it stays beside the run's images) or, with ``embed=True``, embedded as JPEG
thumbnails (the page is self-contained). Every string from the data is HTML-escaped; a small
inline script marks images that failed to load, so a missing file is visible, not silent.
"""

from __future__ import annotations

import base64
import html
import io
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from classification.data.dataset import find_crops_manifest, read_crops_manifest
from classification.data.images import DECODE_ERRORS, read_thumbnail
from classification.errors import DataError, UserError
from classification.evaluation.report import read_prediction_info
from classification.io import read_string_csv, write_text_atomic

PAGE_NAME = "review.html"
UNKNOWN_LABEL = "unknown"
SPECIES, NO_ANSWER = "species", "none"  # ranks: a model class; no answer (unknown); anything else is a taxon's rank
DEFAULT_PER_CLASS = 12
THUMBNAIL_SIDE = 192

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
nav a { margin-right: 0.8em; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 0.6em; }
figure { margin: 0; width: 200px; border: 1px solid #ddd; padding: 4px; font-size: 0.8em; }
figure img { max-width: 192px; max-height: 192px; display: block; }
figure.wrong { border-color: #c33; background: #fee; }
figure.broken, figure.missing { border-style: dashed; }
.missing-note { color: #c33; }
"""
# Marks each image that did not load (a moved or deleted crop) and counts them on <body>; no data enters the script.
SCRIPT = """
window.addEventListener('load', function () {
  var broken = 0;
  document.querySelectorAll('img').forEach(function (img) {
    var ok = img.complete && img.naturalWidth > 0;
    img.setAttribute('data-loaded', ok ? 'yes' : 'no');
    if (!ok) { broken += 1; img.closest('figure').classList.add('broken'); }
  });
  document.body.setAttribute('data-images-checked', 'yes');
  document.body.setAttribute('data-broken-images', String(broken));
});
"""


@dataclass(frozen=True)
class PageOptions:
    """How the page is made."""

    per_class: int = DEFAULT_PER_CLASS
    seed: int = 0
    embed: bool = False


def escape(value: Any) -> str:
    """Text or attribute value from the data, HTML-escaped (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


# ---------------------------------------------------------------- the rows


def images_root_of(predictions_path: Path, given: Path | None) -> Path:
    """The folder the predictions' paths are relative to: the one given, else ``prediction_info.json``'s, else the file's folder."""
    if given is not None:
        return Path(given)
    root = read_prediction_info(predictions_path).get("images_root")
    return Path(root) if root else predictions_path.parent


def read_review_table(path: Path) -> pd.DataFrame:
    """``predictions.csv`` or ``postprocessed.csv`` as one table: ``pred_label`` the label shown (the final ``answer`` when
    there is one) with its ``confidence`` and ``rank``, and ``model_label`` the model's own top-1."""
    frame = read_string_csv(path, ("path", "true_label", "pred_label", "confidence"))
    frame["model_label"] = frame["pred_label"]
    if "answer" in frame:
        frame["pred_label"] = frame["answer"]
        frame["confidence"] = frame.get("answer_confidence", frame["confidence"])
        frame["rank"] = frame.get("answer_rank", SPECIES)
    else:
        frame["rank"] = [NO_ANSWER if label == UNKNOWN_LABEL else SPECIES for label in frame["pred_label"]]
    try:
        frame["confidence"] = pd.to_numeric(frame["confidence"].replace("", "nan")).astype(float)
    except ValueError:
        raise DataError(f"{path}: confidence: expected numbers from 0 to 1") from None
    return frame


def with_sequences(predictions: pd.DataFrame, images_root: Path) -> pd.DataFrame:
    """``predictions`` with a ``seq_id`` column: its own when it has one, else the crops manifest's, else empty."""
    frame = predictions.copy()
    if "seq_id" in frame:
        frame["seq_id"] = frame["seq_id"].fillna("").astype(str)
        return frame
    manifest_path = find_crops_manifest(images_root)
    sequences: dict[str, str] = {}
    if manifest_path is not None:
        manifest = read_crops_manifest(manifest_path)
        if "seq_id" in manifest:
            sequences = dict(zip(manifest["crop_path"], manifest["seq_id"]))
    frame["seq_id"] = [sequences.get(str(path), "") for path in frame["path"]]
    return frame


def sample_rows(frame: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    """A seeded sample of at most ``count`` rows, most confident first."""
    sample = frame.sample(n=min(count, len(frame)), random_state=seed) if len(frame) > count else frame
    return sample.sort_values("confidence", ascending=False, kind="stable")


def mistakes_of(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a known true label whose class answer is another class (an ``unknown`` answer is an abstention, and a taxon
    it rolled up to is not checked here: neither is a mistake)."""
    known = frame[(frame["true_label"] != "") & (frame["rank"] == SPECIES)]
    return known[known["true_label"] != known["pred_label"]].sort_values("confidence", ascending=False, kind="stable")


# ---------------------------------------------------------------- HTML


def image_file(path: str, images_root: Path) -> Path:
    """The image file of a predictions row."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else images_root / candidate


def relative_url(target: Path, page_dir: Path) -> str:
    """A URL from the page to ``target`` (relative, percent-encoded), for ``src`` and ``href``."""
    relative = os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())
    return urllib.parse.quote(Path(relative).as_posix(), safe="/")


def embedded_thumbnail(path: Path) -> str | None:
    """A ``data:`` URI of a JPEG thumbnail, or None when the image cannot be read."""
    try:
        thumbnail = read_thumbnail(path, THUMBNAIL_SIDE)
    except DECODE_ERRORS:
        return None
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def card(row: Any, images_root: Path, page_dir: Path, embed: bool) -> str:
    """One crop: the image (linked to its file), predicted label and confidence, true label, sequence, location."""
    path = image_file(str(row["path"]), images_root)
    wrong = bool(row["true_label"]) and row["rank"] == SPECIES and row["true_label"] != row["pred_label"]
    rank = "" if row["rank"] in (SPECIES, NO_ANSWER) else f" ({escape(row['rank'])})"
    lines = [f"<b>{escape(row['pred_label'])}</b>{rank} {float(row['confidence']):.1%}"]
    if row["model_label"] != row["pred_label"]:
        lines.append(f"model top-1: {escape(row['model_label'])}")
    if row["true_label"]:
        lines.append(f"true: {escape(row['true_label'])}")
    if row["seq_id"]:
        lines.append(f"sequence: {escape(row['seq_id'])}")
    if row.get("location"):
        lines.append(f"location: {escape(row['location'])}")
    lines.append(f"<small>{escape(row['path'])}</small>")
    caption = "<figcaption>" + "<br>".join(lines) + "</figcaption>"
    if not path.is_file():
        return f'<figure class="missing"><span class="missing-note">image not found</span>{caption}</figure>'
    source = embedded_thumbnail(path) if embed else relative_url(path, page_dir)
    if source is None:
        return f'<figure class="missing"><span class="missing-note">image unreadable</span>{caption}</figure>'
    image = f'<img src="{escape(source)}" alt="{escape(row["pred_label"])}">'
    link = f'<a href="{escape(relative_url(path, page_dir))}">{image}</a>'
    return f'<figure class="{"wrong" if wrong else "right"}">{link}{caption}</figure>'


def section(anchor: str, title: str, note: str, cards: list[str]) -> str:
    """A heading, a line saying what is shown, and a grid of cards."""
    return (f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2><p>{escape(note)}</p>'
            f'<div class="grid">{"".join(cards)}</div><p><a href="#top">back to the top</a></p></section>')


def summary_table(frame: pd.DataFrame, anchors: dict[str, str]) -> str:
    """Per predicted class: how many, mean confidence, and (when labels are known) how many are right."""
    rows = ["<tr><th>predicted</th><th>crops</th><th>mean confidence</th><th>labelled</th><th>right</th></tr>"]
    for label, group in frame.groupby("pred_label", sort=True):
        labelled = group[group["true_label"] != ""]
        right = int((labelled["true_label"] == labelled["pred_label"]).sum()) if group["rank"].iloc[0] == SPECIES else ""
        rows.append(f'<tr><td><a href="#{escape(anchors[str(label)])}">{escape(label)}</a></td><td>{len(group)}</td>'
                    f'<td>{group["confidence"].mean():.1%}</td><td>{len(labelled)}</td>'
                    f'<td>{right if len(labelled) else ""}</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def class_sections(frame: pd.DataFrame, anchors: dict[str, str], images_root: Path, page_dir: Path,
                   options: PageOptions) -> list[str]:
    """One section per predicted class, the unknown bucket last."""
    ranks = frame.groupby("pred_label")["rank"].first().to_dict()
    labels = sorted(anchors, key=lambda label: (ranks[label] == NO_ANSWER, ranks[label] != SPECIES, label))
    sections = []
    for label in labels:
        group = frame[frame["pred_label"] == label]
        sample = sample_rows(group, options.per_class, options.seed)
        if ranks[label] == NO_ANSWER:
            title = f"Unknown: the model did not answer ({len(group)} crops)"
        elif ranks[label] != SPECIES:
            title = f"Rolled up to {label} ({ranks[label]}): no class was sure enough ({len(group)} crops)"
        else:
            title = f"Predicted {label} ({len(group)} crops)"
        note = f"{len(sample)} of {len(group)} shown (a random sample, seed {options.seed}), most confident first."
        sections.append(section(anchors[label], title, note, [card(row, images_root, page_dir, options.embed)
                                                               for row in sample.to_dict("records")]))
    return sections


def mistakes_section(frame: pd.DataFrame, images_root: Path, page_dir: Path, options: PageOptions) -> str:
    """The confident mistakes, up to ``per_class`` per true class."""
    mistakes = mistakes_of(frame)
    shown = mistakes.groupby("true_label", sort=True, group_keys=False).head(options.per_class)
    shown = shown.sort_values(["true_label", "confidence"], ascending=[True, False], kind="stable")
    labelled = int((frame["true_label"] != "").sum())
    note = (f"{len(mistakes)} of {labelled} labelled crops are answered with another class; "
            f"up to {options.per_class} per true class shown, most confident first.")
    return section("mistakes", "Mistakes", note, [card(row, images_root, page_dir, options.embed) for row in shown.to_dict("records")])


def render_review_page(frame: pd.DataFrame, title: str, images_root: Path, page_dir: Path, options: PageOptions) -> str:
    """The whole page as a string."""
    anchors = {label: f"class-{i}" for i, label in enumerate(sorted(frame["pred_label"].unique()))}
    labels_known = bool((frame["true_label"] != "").any())
    nav = [f'<a href="#{escape(anchors[label])}">{escape(label)}</a>' for label in sorted(anchors)]
    if labels_known:
        nav.append('<a href="#mistakes">mistakes</a>')
    body = [f'<h1 id="top">{escape(title)}</h1>', f"<p>{len(frame)} predictions, {len(anchors)} predicted classes; "
            f"images from {escape(images_root)}.</p>", "<nav>" + "".join(nav) + "</nav>", summary_table(frame, anchors)]
    body += class_sections(frame, anchors, images_root, page_dir, options)
    if labels_known:
        body.append(mistakes_section(frame, images_root, page_dir, options))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_review_page(predictions_path: str | Path, output: str | Path | None = None, images_root: Path | None = None,
                      options: PageOptions | None = None) -> Path:
    """Write the review page of ``predictions_path`` (default: ``review.html`` beside it) and return its path."""
    options = options or PageOptions()
    if options.per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {options.per_class}")
    if not 0 <= options.seed < 2**32:
        raise UserError(f"--seed must be from 0 to 2**32 - 1 (numpy's seeds), got {options.seed}")
    if images_root is not None and not Path(images_root).is_dir():
        raise UserError(f"--images-root {images_root}: folder not found")
    predictions_path = Path(predictions_path)
    root = images_root_of(predictions_path, images_root)
    frame = with_sequences(read_review_table(predictions_path), root)
    output = Path(output) if output is not None else predictions_path.parent / PAGE_NAME
    title = f"Review: {predictions_path.parent.name}/{predictions_path.name}"
    write_text_atomic(output, render_review_page(frame, title, root, output.parent, options))
    return output
