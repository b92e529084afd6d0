"""The static HTML review page (classifier/review_page.py): parsed, and rendered in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from classification.data.cct import read_image_size
from classification.evaluation.report import prediction_columns
from classification.evaluation.review_page import PageOptions, embedded_thumbnail, write_review_page
from tests.helpers.demo import TrainedRun
from tests.helpers.processes import REPO_ROOT, run_entry_point, run_in_process
from tests.helpers.training import train_env

HOSTILE = '<script>alert("x")</script> & \'quotes\''  # a class name from the data that must stay text
ODD_NAME = "odd name #1 ü.jpg"  # a crop whose file name needs percent-encoding in a URL
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


@dataclass
class Page:
    """What an HTML parser sees in a page."""

    images: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    scripts: int = 0
    figures: list[dict[str, str]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


class PageParser(HTMLParser):
    """Collects img sources, link targets, element ids, figures and scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.page = Page()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if "id" in values:
            self.page.ids.add(values["id"])
        if tag == "img":
            self.page.images.append(values.get("src", ""))
        elif tag == "a":
            self.page.links.append(values.get("href", ""))
        elif tag == "script":
            self.page.scripts += 1
        elif tag == "figure":
            self.page.figures.append(values)

    def handle_data(self, data: str) -> None:
        self.page.text.append(data)


def parse(html_text: str) -> Page:
    parser = PageParser()
    parser.feed(html_text)
    return parser.page


def target_of(url: str, page: Path) -> Path:
    """The file a relative URL of the page points to."""
    return (page.parent / urllib.parse.unquote(url)).resolve()


@dataclass(frozen=True)
class Run:
    """A prediction run over real crops: predictions.csv, prediction_info.json, the crops with their manifest."""

    predictions: Path
    crops: Path


@pytest.fixture
def run(shared_data: Path, tmp_path: Path) -> Run:
    """Twelve real MCT images as crops: three classes, an unknown bucket, mistakes, a hostile label, an odd file name."""
    images = sorted((shared_data / "mct" / "images").rglob("*.JPG"))[:12]
    if len(images) < 12:
        pytest.skip("fewer than 12 MCT images in ../shared/data/mct")
    crops = tmp_path / "crops"
    crops.mkdir()
    names = [f"crop_{i}.jpg" for i in range(11)] + [ODD_NAME]
    for image, name in zip(images, names):
        shutil.copy(image, crops / name)
    truth = ["deer", "deer", "deer", "fox", "fox", "fox", "bird", "bird", "deer", "fox", "", "bird"]
    predicted = ["deer", "deer", "fox", "fox", "fox", "unknown", "bird", "deer", "unknown", HOSTILE, "deer", "bird"]
    rows = [{"path": name, "dataset": "mct", "location": f"loc{i % 3}", "true_label": t, "true_prob": 0.5, "pred_label": p,
             "confidence": 0.4 + 0.05 * i, "top1_label": p, "top2_label": "deer", "top1_prob": 0.4 + 0.05 * i, "top2_prob": 0.1}
            for i, (name, t, p) in enumerate(zip(names, truth, predicted))]
    out = tmp_path / "runs" / "tiny" / "predictions" / "val_best"
    out.mkdir(parents=True)
    pd.DataFrame(rows, columns=prediction_columns(2)).to_csv(out / "predictions.csv", index=False)
    (out / "prediction_info.json").write_text(json.dumps({"images_root": str(crops)}))
    manifest = pd.DataFrame({"crop_path": names, "dataset": "mct", "location": "x", "label": truth,
                             "seq_id": [f"seq<{i // 4}>" for i in range(12)]})
    manifest.to_csv(crops / "crops_manifest.csv", index=False)
    return Run(out / "predictions.csv", crops)


def test_the_page_shows_classes_unknown_and_mistakes_with_escaped_text(run: Run) -> None:
    page_path = write_review_page(run.predictions)
    assert page_path == run.predictions.parent / "review.html"
    text = page_path.read_text(encoding="utf-8")
    page = parse(text)
    assert page.scripts == 1  # ours: the hostile label did not become a script
    assert HOSTILE not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quotes&#x27;" in text
    body = " ".join(page.text)
    assert "Unknown: the model did not answer (2 crops)" in body and "Mistakes" in body
    assert "sequence: seq<2>" in body  # the sequence, from the crops manifest, shown as text
    assert "3 of 11 labelled crops are answered with another class" in body  # unknown answers are abstentions, not mistakes
    wrong = [f for f in page.figures if f.get("class") == "wrong"]
    assert len(wrong) == 2 * 3  # each mistake shows in its class section and in the mistakes section


def test_the_postprocessed_answers_are_shown_with_unknown_and_taxa(run: Run) -> None:
    predictions = pd.read_csv(run.predictions, dtype=str, keep_default_na=False)
    answers = ["deer", "deer", "Cervidae", "fox", "fox", "unknown", "bird", "deer", "unknown", "unknown", "deer", "bird"]
    ranks = ["species", "species", "family", "species", "species", "none", "species", "species", "none", "none", "species", "species"]
    table = pd.DataFrame({"path": predictions["path"], "dataset": "mct", "location": predictions["location"], "image": "",
                          "seq_id": [f"s{i // 3}" for i in range(12)], "true_label": predictions["true_label"],
                          "raw_label": predictions["pred_label"], "raw_confidence": predictions["confidence"],
                          "pred_label": predictions["pred_label"], "confidence": predictions["confidence"], "answer": answers,
                          "answer_rank": ranks, "answer_confidence": 0.9, "species_list": ""})
    table.to_csv(run.predictions.parent / "postprocessed.csv", index=False)
    page_path = write_review_page(run.predictions.parent / "postprocessed.csv")
    body = " ".join(parse(page_path.read_text(encoding="utf-8")).text)
    assert "Unknown: the model did not answer (3 crops)" in body
    assert "Rolled up to Cervidae (family): no class was sure enough (1 crops)" in body
    assert "1 of 11 labelled crops are answered with another class" in body  # bird answered deer; the roll-up is no mistake
    assert "sequence: s3" in body and "model top-1: fox" in body


def test_every_image_and_link_of_the_page_exists(run: Run) -> None:
    page_path = write_review_page(run.predictions)
    page = parse(page_path.read_text(encoding="utf-8"))
    assert len(page.images) == 12 + 3 and not any(src.startswith(("/", "file:", "data:")) for src in page.images)
    for src in page.images:
        assert target_of(src, page_path).is_file(), src
    assert any(ODD_NAME in urllib.parse.unquote(src) for src in page.images)
    for href in page.links:
        if href.startswith("#"):
            assert href[1:] in page.ids, href
        else:
            assert target_of(href, page_path).is_file(), href


def test_a_missing_crop_is_shown_as_missing(run: Run) -> None:
    (run.crops / "crop_0.jpg").unlink()
    page = parse(write_review_page(run.predictions).read_text(encoding="utf-8"))
    assert "image not found" in " ".join(page.text) and len(page.images) == 12 + 3 - 1


def test_embedded_thumbnails_make_one_self_contained_file(run: Run, tmp_path: Path) -> None:
    page_path = write_review_page(run.predictions, tmp_path / "elsewhere" / "page.html", options=PageOptions(embed=True, per_class=2))
    page = parse(page_path.read_text(encoding="utf-8"))
    assert page.images and all(src.startswith("data:image/jpeg;base64,") for src in page.images)


def test_the_entry_point(run: Run) -> None:
    result = run_entry_point("classifier/review_page.py", "--predictions", run.predictions, "--per-class", "3")
    assert result.returncode == 0, result.stderr
    assert (run.predictions.parent / "review.html").is_file()
    result = run_in_process("classifier/review_page.py", "--predictions", run.predictions.parent / "nope.csv")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nope.csv: file not found" in result.stderr


@pytest.mark.slow
def test_predict_writes_the_page_of_a_real_run(request: pytest.FixtureRequest) -> None:
    """classifier/predict.py --review-page on a tiny model trained by classifier/train.py on the demo pipeline's crops."""
    real: TrainedRun = request.getfixturevalue("trained")
    result = run_in_process("classifier/predict.py", "--config", real.config, "--checkpoint", "best", "--split", "val",
                            "--review-page", env=train_env())
    assert result.returncode == 0, result.stderr
    page_path = real.run_dir / "predictions" / "val_best" / "review.html"
    assert f"review page: {page_path}" in result.stdout
    page = parse(page_path.read_text(encoding="utf-8"))
    assert page.images and all(target_of(src, page_path).is_file() for src in page.images)
    assert "sequence: " in " ".join(page.text)  # the demo's sequences, from its crops manifest


# ---------------------------------------------------------------- a real browser


def chromium() -> str:
    """The headless browser's executable; the test is skipped (with how to install it) where there is none."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium: `apt-get install chromium` (Debian; .ci/run does this) to render the review page in a real browser")


def browser(*args: str) -> str:
    """Run headless Chromium on a file:// page (root needs --no-sandbox) and return its stdout."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--allow-file-access-from-files",
               "--virtual-time-budget=10000", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_page_renders_in_headless_chromium_with_every_image_loaded(run: Run, tmp_path: Path) -> None:
    page_path = write_review_page(run.predictions)
    dom = browser("--dump-dom", page_path.resolve().as_uri())
    rendered = parse(dom)
    assert 'data-images-checked="yes"' in dom, "the page's load handler did not run"
    assert 'data-broken-images="0"' in dom
    assert dom.count('data-loaded="yes"') == len(rendered.images) == 12 + 3
    assert rendered.scripts == 1 and "&lt;script&gt;alert" in dom
    for href in rendered.links:  # links as the browser resolved the DOM: anchors exist, files exist
        assert href[1:] in rendered.ids if href.startswith("#") else target_of(href, page_path).is_file(), href
    screenshot = tmp_path / "review.png"
    browser(f"--screenshot={screenshot}", "--window-size=1200,1600", page_path.resolve().as_uri())
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_crop_is_reported_by_the_browser_too(run: Run) -> None:
    page_path = write_review_page(run.predictions)
    (run.crops / "crop_1.jpg").unlink()  # deleted after the page was written: the browser finds it broken
    dom = browser("--dump-dom", page_path.resolve().as_uri())
    assert 'data-broken-images="1"' in dom and dom.count('data-loaded="no"') == 1
    assert '<figure class="right broken" id=' in dom


# ---------------------------------------------------------------- hostile rows (issue 17)


def set_first_row(predictions: Path, **values: str) -> None:
    """Change the first data row (line 2) of a predictions.csv."""
    frame = pd.read_csv(predictions, dtype=str, keep_default_na=False)
    for column, value in values.items():
        frame.loc[0, column] = value
    frame.to_csv(predictions, index=False)


def outside_image(run: Run) -> Path:
    """A real JPEG outside the images folder: a user's private photo that no page may read, embed or link."""
    private = run.crops.parent / "home" / "user" / "private.jpg"
    private.parent.mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(private)  # unlike every crop, so its thumbnail is recognisable
    return private


def leading_out(run: Run, how: str) -> str:
    """The ``path`` of a row that leads out of the images folder (or to no regular file), made on disk."""
    private = outside_image(run)
    if how == "climbing out":
        return os.path.relpath(private, run.crops)
    if how == "absolute":
        return str(private)
    if how == "symlinked file":
        (run.crops / "link.jpg").symlink_to(private)
        return "link.jpg"
    if how == "symlinked folder":
        (run.crops / "sub").symlink_to(private.parent, target_is_directory=True)
        return "sub/private.jpg"
    os.mkfifo(run.crops / "pipe.jpg")  # opening it would block the page for ever
    return "pipe.jpg"


def assert_nothing_outside(page_path: Path, crops: Path, private: Path) -> None:
    """No image source or link of the page leads out of ``crops``, and the private image is not embedded."""
    page = parse(page_path.read_text(encoding="utf-8"))
    assert embedded_thumbnail(private) not in page.images
    for url in page.images + page.links:
        if not url.startswith(("#", "data:")):
            assert target_of(url, page_path).is_relative_to(crops.resolve()), url


LEADING_OUT = ["climbing out", "absolute", "symlinked file", "symlinked folder", "a FIFO"]


@pytest.mark.parametrize("embed", [True, False], ids=["embedded", "linked"])
@pytest.mark.parametrize("how", LEADING_OUT)
def test_a_row_leading_out_of_the_images_folder_is_shown_without_its_image(how: str, embed: bool, run: Run) -> None:
    path = leading_out(run, how)
    set_first_row(run.predictions, path=path)
    flags = ["--embed-thumbnails"] if embed else []
    result = subprocess.run([*run_entry_point_command("classifier/review_page.py"), "--predictions", str(run.predictions),
                             *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reason = "not a regular file" if how == "a FIFO" else "outside the images folder"
    assert result.stderr.count("\n") == 1 and "predictions.csv: 1 rows shown without their image: row 2: path" in result.stderr
    assert reason in result.stderr, result.stderr
    page_path = run.predictions.parent / "review.html"
    assert_nothing_outside(page_path, run.crops, run.crops.parent / "home" / "user" / "private.jpg")
    assert f"image not shown: {reason}" in " ".join(parse(page_path.read_text(encoding="utf-8")).text)


def test_a_source_image_outside_the_source_folder_is_not_shown(run: Run, tmp_path: Path) -> None:
    """The lightbox's whole image comes from the crops manifest's file_name: it is confined to --source-images too."""
    private = outside_image(run)
    sources = tmp_path / "sources"
    sources.mkdir()
    manifest = pd.read_csv(run.crops / "crops_manifest.csv", dtype=str, keep_default_na=False)
    manifest["file_name"] = os.path.relpath(private, sources)
    for column in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"):
        manifest[column] = "10"
    manifest.to_csv(run.crops / "crops_manifest.csv", index=False)
    for embed in (True, False):
        page_path = write_review_page(run.predictions, options=PageOptions(embed=embed, source_images=sources))
        assert_nothing_outside(page_path, run.crops, private)
        assert "lightbox" not in page_path.read_text(encoding="utf-8").split("</style>")[1]


def run_entry_point_command(script: str) -> list[str]:
    """The command line ``run_entry_point`` runs (for a call that needs its own timeout: a FIFO must not hang it)."""
    return [sys.executable, str(REPO_ROOT / script)]


@pytest.mark.parametrize("value", ["inf", "-3", "1.5", "nan", "1e400", "high", "-inf"])
def test_a_confidence_outside_0_to_1_stops_the_page_with_one_line(value: str, run: Run) -> None:
    set_first_row(run.predictions, confidence=value)
    result = run_entry_point("classifier/review_page.py", "--predictions", run.predictions)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"predictions.csv: row 2: confidence: expected a probability from 0 to 1, got {value!r}" in result.stderr
    assert not (run.predictions.parent / "review.html").exists()  # never a page of inf% or -300.0%


def test_an_answer_confidence_outside_0_to_1_names_its_column(run: Run) -> None:
    frame = pd.read_csv(run.predictions, dtype=str, keep_default_na=False)
    frame["answer"], frame["answer_rank"], frame["answer_confidence"] = frame["pred_label"], "species", "0.5"
    frame.loc[3, "answer_confidence"] = "inf"
    frame.to_csv(run.predictions.parent / "postprocessed.csv", index=False)
    result = run_in_process("classifier/review_page.py", "--predictions", run.predictions.parent / "postprocessed.csv")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "postprocessed.csv: row 5: answer_confidence: expected a probability from 0 to 1, got 'inf'" in result.stderr


@pytest.mark.parametrize("path", ["x" * 5000 + ".jpg", "/".join(["d" * 200] * 25) + "/a.jpg", "bad\x01name\x7f.jpg"],
                         ids=["5000-character name", "5000-character path", "control characters"])
def test_an_unusable_path_is_one_line_not_a_traceback(path: str, run: Run) -> None:
    set_first_row(run.predictions, path=path)
    result = run_entry_point("classifier/review_page.py", "--predictions", run.predictions, "--embed-thumbnails")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") <= 1 and len(result.stderr) < 400, result.stderr  # a 5000-character path is not echoed
    if result.stderr:
        assert "predictions.csv: 1 rows shown without their image: row 2: path" in result.stderr
    assert (run.predictions.parent / "review.html").is_file()


MEASURE = """<script>
window.addEventListener('load', function () {
  var bad = [], sizes = {};
  document.querySelectorAll('figure').forEach(function (f) {
    var r = f.getBoundingClientRect();
    sizes[Math.round(r.width) + 'x' + Math.round(r.height)] = 1;
    if (f.scrollWidth > f.clientWidth || f.scrollHeight > f.clientHeight) bad.push(f.id);
    f.querySelectorAll(':scope > *, .line').forEach(function (e) {
      var q = e.getBoundingClientRect();
      if (q.right > r.right + 0.5 || q.left < r.left - 0.5 || q.bottom > r.bottom + 0.5) bad.push(f.id + ':' + e.className);
    });
  });
  var shown = document.querySelector('.lightbox:target'), box = '';
  if (shown) {
    var i = shown.querySelector('img').getBoundingClientRect(), b = shown.querySelector('.box').getBoundingClientRect();
    box = [(b.left - i.left) / i.width, (b.top - i.top) / i.height, b.width / i.width, b.height / i.height].map(
      function (v) { return v.toFixed(3); }).join(' ');
  }
  document.body.setAttribute('data-overflow', bad.join(' ') || 'none');
  document.body.setAttribute('data-sizes', Object.keys(sizes).join(' '));
  document.body.setAttribute('data-box', box);
});
</script>"""


def test_long_names_stay_in_their_cards_and_a_click_shows_the_whole_image_in_chromium(run: Run, tmp_path: Path) -> None:
    """At 1300 px wide no card's text runs out of it, the cards are one size, and a card's lightbox draws the box where it is."""
    chromium()
    sources = tmp_path / "sources"
    sources.mkdir()
    frame = pd.read_csv(run.predictions, dtype=str, keep_default_na=False)
    manifest = pd.read_csv(run.crops / "crops_manifest.csv", dtype=str, keep_default_na=False)
    for i, name in enumerate(list(frame["path"])):
        long = f"mct/images/{'SITE_0' + str(i) * 40}/IMG_{i:04d}.JPG___crop_{'f' * 60}{i}.jpg"
        (run.crops / long).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run.crops / name, run.crops / long)
        shutil.copy(run.crops / name, sources / name)
        frame.loc[i, "path"], manifest.loc[i, "crop_path"], manifest.loc[i, "file_name"] = long, long, name
    frame["pred_label"] = frame["pred_label"].where(frame.index != 0, "a_very_long_label_" * 6)
    for column, value in zip(("bbox_x", "bbox_y", "bbox_w", "bbox_h"), ("10", "20", "40", "30")):
        manifest[column] = value
    frame.to_csv(run.predictions, index=False)
    manifest.to_csv(run.crops / "crops_manifest.csv", index=False)
    page_path = write_review_page(run.predictions, options=PageOptions(source_images=sources))
    text = page_path.read_text(encoding="utf-8")
    assert 'title="' + frame.loc[1, "path"] + '"' in text  # the whole name on hover
    measured = page_path.with_name("measured.html")
    measured.write_text(text.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    first = parse(text).figures[0]["id"]
    dom = browser("--window-size=1300,1000", "--dump-dom", measured.resolve().as_uri() + f"#{first}-view")
    assert 'data-overflow="none"' in dom, dom[dom.index("data-overflow"):][:400]
    assert len(dom.split('data-sizes="')[1].split('"')[0].split()) == 1  # every card one size
    sizes = {read_image_size(source) for source in sources.iterdir()}
    assert len(sizes) == 1  # the MCT camera's: whichever card is first, its box is at these fractions
    (width, height), = sizes
    box = [float(v) for v in dom.split('data-box="')[1].split('"')[0].split()]
    assert box == pytest.approx([10 / width, 20 / height, 40 / width, 30 / height], abs=0.002), "the box is not where the crop is"
