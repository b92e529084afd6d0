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

What the page refuses: a confidence that is not a number from 0 to 1 (``inf``, ``-3``, ``nan``, text) stops it
(one line naming the row and column: the file is not a prediction table, and a page of ``inf%`` would mislead).
A row whose path leaves the images folder (``..``,
an absolute path, a symlink pointing out), names no regular file (a FIFO, a folder) or cannot be a path
(too long) is shown without its image and reported in one line: no file outside the images folder is
read, embedded or linked. With ``source_images`` (the folder ``crop_detections.py`` cropped from) a click
on a crop opens its whole image with the box drawn (from the crops manifest), by CSS ``:target`` alone.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from classification.data.cct import read_image_size
from classification.data.dataset import find_crops_manifest, read_crops_manifest
from classification.data.images import DECODE_ERRORS, read_thumbnail
from classification.errors import UserError
from classification.evaluation.report import probabilities_of, read_prediction_info
from classification.io import file_kind, read_string_csv, write_text_atomic

log = logging.getLogger(__name__)

PAGE_NAME = "review.html"
UNKNOWN_LABEL = "unknown"
SPECIES, NO_ANSWER = "species", "none"  # ranks: a model class; no answer (unknown); anything else is a taxon's rank
DEFAULT_PER_CLASS = 12
THUMBNAIL_SIDE = 192
FULL_IMAGE_SIDE = 1280  # an embedded whole image (the lightbox): enough to judge a box, not the camera's full size
QUOTED_CHARS = 80  # the most characters of a path a message quotes
REPORTED_ROWS = 5  # refused rows named in the one-line report
BOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
nav a { margin-right: 0.8em; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 0.6em; }
figure { margin: 0; width: 202px; height: 310px; box-sizing: border-box; overflow: hidden; border: 1px solid #ddd;
         padding: 4px; font-size: 0.8em; }
figure .thumb { height: 192px; display: flex; align-items: center; justify-content: center; }
figure img { max-width: 192px; max-height: 192px; display: block; }
figcaption .line { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
figure.wrong { border-color: #c33; background: #fee; }
figure.broken, figure.missing { border-style: dashed; }
.missing-note { color: #c33; overflow-wrap: anywhere; }
.lightbox { display: none; position: fixed; inset: 0; z-index: 10; background: rgba(0, 0, 0, 0.85); color: #fff;
            flex-direction: column; align-items: center; justify-content: center; }
.lightbox:target { display: flex; }
.lightbox a { color: #fff; }
.lightbox p { max-width: 90vw; overflow-wrap: anywhere; }
.frame { position: relative; display: inline-block; }
.frame img { max-width: 90vw; max-height: 80vh; display: block; }
.box { position: absolute; box-sizing: border-box; border: 3px solid #ff3b30; }
"""
# Marks each image that did not load (a moved or deleted crop) and counts them on <body>; no data enters the script.
SCRIPT = """
window.addEventListener('load', function () {
  var broken = 0;
  document.querySelectorAll('figure img').forEach(function (img) {
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
    source_images: Path | None = None  # the folder the crops were cut from: a click shows the whole image with its box


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
    column = "answer_confidence" if "answer" in frame and "answer_confidence" in frame else "confidence"
    frame["confidence"] = probabilities_of(frame["confidence"], path, column)  # inf%, -300.0% would mislead the reader
    return frame


def quoted(text: Any) -> str:
    """A value as a message quotes it: at most ``QUOTED_CHARS`` characters (a 5000-character path is not echoed)."""
    text = str(text)
    return repr(text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS] + "...")


def percent(value: float) -> str:
    """A confidence as the page shows it (none: a dash)."""
    return "-" if math.isnan(value) else f"{value:.1%}"


def with_sequences(predictions: pd.DataFrame, images_root: Path) -> pd.DataFrame:
    """``predictions`` with a ``seq_id`` column (its own when it has one, else the crops manifest's, else empty) and the
    manifest's source image (``file_name``) and box (``bbox_x`` ...) of each crop, empty where unknown."""
    frame = predictions.copy()
    manifest_path = find_crops_manifest(images_root)
    manifest = read_crops_manifest(manifest_path) if manifest_path is not None else pd.DataFrame({"crop_path": []})
    wanted = ["seq_id", "file_name", *BOX_COLUMNS]
    if "seq_id" in frame:
        frame["seq_id"] = frame["seq_id"].fillna("").astype(str)
        wanted.remove("seq_id")
    for column in wanted:
        values = dict(zip(manifest["crop_path"], manifest[column])) if column in manifest else {}
        frame[column] = [str(values.get(str(path), "")) for path in frame["path"]]
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


def safe_file(path: str, root: Path) -> tuple[Path | None, str]:
    """The regular file ``path`` names under ``root`` (resolved: ``..`` and symlinks followed), else None and why not:
    the page reads, embeds and links nothing outside the folder, and stats before opening (a FIFO would block)."""
    try:
        resolved = image_file(path, root).resolve()
        if not resolved.is_relative_to(root.resolve()):
            return None, f"outside the images folder {root}"
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        return None, "not found"
    except (OSError, ValueError) as error:  # too long a name, a NUL byte, a loop of links
        return None, f"not a usable path ({getattr(error, 'strerror', None) or error})"
    if not stat.S_ISREG(mode):
        return None, f"not a regular file ({file_kind(mode)})"
    return resolved, ""


def with_files(frame: pd.DataFrame, images_root: Path) -> pd.DataFrame:
    """``frame`` with ``file`` (the safe image file, or "") and ``problem`` (why there is none, or "") per row."""
    frame = frame.copy()
    found = [safe_file(str(path), images_root) for path in frame["path"]]
    frame["file"] = ["" if file is None else str(file) for file, _ in found]
    frame["problem"] = [problem for _, problem in found]
    return frame


def report_refused(frame: pd.DataFrame, predictions_path: Path) -> int:
    """Log one line naming the rows whose image was refused (not the missing ones: the page marks those); their count."""
    refused = [(index, row) for index, row in enumerate(frame.to_dict("records")) if row["problem"] not in ("", "not found")]
    if refused:
        named = "; ".join(f"row {index + 2}: path {quoted(row['path'])}: {row['problem']}" for index, row in refused[:REPORTED_ROWS])
        more = f" (and {len(refused) - REPORTED_ROWS} more)" if len(refused) > REPORTED_ROWS else ""
        log.warning("%s: %d rows shown without their image: %s%s", predictions_path, len(refused), named, more)
    return len(refused)


def relative_url(target: Path, page_dir: Path) -> str:
    """A URL from the page to ``target`` (relative, percent-encoded), for ``src`` and ``href``."""
    relative = os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())
    return urllib.parse.quote(Path(relative).as_posix(), safe="/")


def embedded_thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> str | None:
    """A ``data:`` URI of a JPEG thumbnail, or None when the image cannot be read."""
    try:
        thumbnail = read_thumbnail(path, side)
    except DECODE_ERRORS:
        return None
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def caption_line(text: str, markup: str | None = None) -> str:
    """One caption line, cut with an ellipsis at the card's edge; the whole text on hover (``title``)."""
    return f'<span class="line" title="{escape(text)}">{escape(text) if markup is None else markup}</span>'


def caption(row: Any) -> str:
    """The card's text: confidence and label, the model's top-1, the true label, sequence, location, the file name."""
    rank = "" if row["rank"] in (SPECIES, NO_ANSWER) else f" ({row['rank']})"
    shown = f"{percent(float(row['confidence']))} {row['pred_label']}{rank}"
    lines = [caption_line(shown, f"{percent(float(row['confidence']))} <b>{escape(row['pred_label'])}</b>{escape(rank)}")]
    if row["model_label"] != row["pred_label"]:
        lines.append(caption_line(f"model top-1: {row['model_label']}"))
    if row["true_label"]:
        lines.append(caption_line(f"true: {row['true_label']}"))
    if row["seq_id"]:
        lines.append(caption_line(f"sequence: {row['seq_id']}"))
    if row.get("location"):
        lines.append(caption_line(f"location: {row['location']}"))
    lines.append(caption_line(str(row["path"]), f"<small>{escape(row['path'])}</small>"))
    return "<figcaption>" + "".join(lines) + "</figcaption>"


def box_style(row: Any, source: Path) -> str | None:
    """The crop's box over its whole image as CSS percentages, or None when the box or the image's size is unknown."""
    try:
        x, y, w, h = (float(row.get(column) or "nan") for column in BOX_COLUMNS)
        width, height = read_image_size(source)
    except (ValueError, *DECODE_ERRORS):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or width <= 0 or height <= 0:
        return None
    return (f"left:{100 * x / width:.3f}%;top:{100 * y / height:.3f}%;"
            f"width:{100 * w / width:.3f}%;height:{100 * h / height:.3f}%")


def lightbox(row: Any, card_id: str, page_dir: Path, options: PageOptions) -> str | None:
    """The crop's whole source image with its box drawn, shown when the card is clicked (CSS ``:target``), or None
    without ``source_images``, a manifest row with the crop's image and box, or a readable image under that folder."""
    if options.source_images is None or not row.get("file_name"):
        return None
    source, _ = safe_file(str(row["file_name"]), Path(options.source_images))
    style = None if source is None else box_style(row, source)
    if source is None or style is None:
        return None
    url = embedded_thumbnail(source, FULL_IMAGE_SIDE) if options.embed else relative_url(source, page_dir)
    if url is None:
        return None
    return (f'<div class="lightbox" id="{escape(card_id)}-view"><p><a href="#{escape(card_id)}">close</a></p>'
            f'<div class="frame"><img src="{escape(url)}" alt="{escape(row["file_name"])}" loading="lazy">'
            f'<div class="box" style="{escape(style)}"></div></div><p>{escape(row["file_name"])}</p></div>')


def card(row: Any, card_id: str, page_dir: Path, options: PageOptions) -> str:
    """One crop: the image (a click opens its whole image with the box, else the crop's file), and its caption."""
    wrong = bool(row["true_label"]) and row["rank"] == SPECIES and row["true_label"] != row["pred_label"]
    text = caption(row)
    if not row["file"]:
        note = "image not found" if row["problem"] == "not found" else f"image not shown: {row['problem']}"
        return f'<figure class="missing" id="{escape(card_id)}"><span class="missing-note thumb">{escape(note)}</span>{text}</figure>'
    path = Path(row["file"])
    source = embedded_thumbnail(path) if options.embed else relative_url(path, page_dir)
    if source is None:
        return f'<figure class="missing" id="{escape(card_id)}"><span class="missing-note thumb">image unreadable</span>{text}</figure>'
    image = f'<img src="{escape(source)}" alt="{escape(row["pred_label"])}">'
    view = lightbox(row, card_id, page_dir, options)
    target = f"#{card_id}-view" if view is not None else relative_url(path, page_dir)
    link = f'<a class="thumb" href="{escape(target)}">{image}</a>'
    return f'<figure class="{"wrong" if wrong else "right"}" id="{escape(card_id)}">{link}{text}</figure>{view or ""}'


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
                    f'<td>{percent(group["confidence"].mean())}</td><td>{len(labelled)}</td>'
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
        sections.append(section(anchors[label], title, note, [card(row, f"{anchors[label]}-{i}", page_dir, options)
                                                               for i, row in enumerate(sample.to_dict("records"))]))
    return sections


def mistakes_section(frame: pd.DataFrame, images_root: Path, page_dir: Path, options: PageOptions) -> str:
    """The confident mistakes, up to ``per_class`` per true class."""
    mistakes = mistakes_of(frame)
    shown = mistakes.groupby("true_label", sort=True, group_keys=False).head(options.per_class)
    shown = shown.sort_values(["true_label", "confidence"], ascending=[True, False], kind="stable")
    labelled = int((frame["true_label"] != "").sum())
    note = (f"{len(mistakes)} of {labelled} labelled crops are answered with another class; "
            f"up to {options.per_class} per true class shown, most confident first.")
    return section("mistakes", "Mistakes", note, [card(row, f"mistake-{i}", page_dir, options)
                                                                  for i, row in enumerate(shown.to_dict("records"))])


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
    if options.source_images is not None and not Path(options.source_images).is_dir():
        raise UserError(f"--source-images {options.source_images}: folder not found")
    predictions_path = Path(predictions_path)
    root = images_root_of(predictions_path, images_root)
    frame = with_files(with_sequences(read_review_table(predictions_path), root), root)
    report_refused(frame, predictions_path)
    output = Path(output) if output is not None else predictions_path.parent / PAGE_NAME
    title = f"Review: {predictions_path.parent.name}/{predictions_path.name}"
    write_text_atomic(output, render_review_page(frame, title, root, output.parent, options))
    return output
