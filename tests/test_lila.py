"""LILA subsets against a mini-LILA on 127.0.0.1 (tests/mini_lila.py): select across datasets, download
(killed half-way and resumed), crop, build the dataset and splits, train one epoch and predict; and the
inputs that must fail in one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from classification.data.lila.index import ALL_IMAGES_FILE, DATASETS_FILE
from classification.data.lila.table import PARQUET_FILE, is_converted
from tests.helpers.processes import REPO_ROOT, SHARED_DATA, run_entry_point
from tests.mini_lila import MiniLila, serve_mini_lila

SUBSET = "utils/download_lila_subset.py"
CCT, MD = "lila_subset_cct.json", "lila_subset_megadetector.json"


@pytest.fixture(scope="module")
def lila(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniLila]:
    if not (SHARED_DATA / "lila_md_test").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA / 'lila_md_test'} (a fresh clone without ../shared)")
    served = serve_mini_lila(SHARED_DATA, tmp_path_factory.mktemp("mini_lila"))
    yield next(served)
    served.close()


def lila_flags(lila: MiniLila, metadata: Path, index_url: str | None = None) -> list[str]:
    return ["--index-url", index_url or lila.url, "--metadata-dir", str(metadata), "--timeout", "5", "--retries", "1"]


def subset(lila: MiniLila, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return run_entry_point(SUBSET, "--output-dir", tmp_path / "subset", *flags, *lila_flags(lila, tmp_path / "meta"))


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_rat_under_three_names_in_three_datasets_is_one_class(lila: MiniLila, tmp_path: Path) -> None:
    result = subset(lila, tmp_path, "--taxon", "rat", "--taxon", "deer", "--include-empty", "2", "--threads", "4")
    assert result.returncode == 0, result.stderr
    cct = json.loads((tmp_path / "subset" / CCT).read_text())
    names = {c["id"]: c["name"] for c in cct["categories"]}
    assert set(names.values()) == {"rattus rattus", "odocoileus virginianus", "empty"}
    rats = [a for a in cct["annotations"] if names[a["category_id"]] == "rattus rattus"]
    assert {a["original_label"] for a in rats} == {"rat", "rattus rattus", "black rat"}
    images = {i["id"]: i for i in cct["images"]}
    assert {images[a["image_id"]]["dataset"] for a in rats} == {"north", "south", "island"}
    assert len({i["file_name"] for i in cct["images"]}) == len(cct["images"])
    located = [i for i in cct["images"] if i["location"] is not None]
    assert all(i["location"].startswith(i["dataset"] + "/") for i in located)
    places = {name: {i["location"] for i in cct["images"] if i["dataset"] == name} for name in ("north", "south")}
    assert places["north"] & places["south"] == set()
    assert all(i["location"] is None for i in cct["images"] if i["dataset"] == "island")  # a dataset without locations
    assert all(i["url"] == i["url_gcp"] and i["url_aws"].startswith(f"{lila.url}/aws/") for i in cct["images"])
    # exactly the subset's images, with their real boxes, under the subset's file names (south's results use backslashes)
    md = json.loads((tmp_path / "subset" / MD).read_text())
    assert sorted(e["file"] for e in md["images"]) == sorted(i["file_name"] for i in cct["images"])
    assert all(e["detections"] is not None for e in md["images"]) and md["info"]["format_version"]
    for image in cct["images"]:
        assert (tmp_path / "subset" / "images" / image["file_name"]).read_bytes() == lila.images[image["file_name"]].read_bytes()
    assert "2 blank images" in result.stdout


def test_labels_map_to_the_rank_asked_and_coarser_rows_are_counted(lila: MiniLila, tmp_path: Path) -> None:
    result = subset(lila, tmp_path, "--taxon", "order=rodentia", "--no-download")
    assert result.returncode == 0, result.stderr
    cct = json.loads((tmp_path / "subset" / CCT).read_text())
    assert {c["name"] for c in cct["categories"]} == {"rattus rattus", "rattus norvegicus"}
    assert "named only above species level: left out" in result.stdout  # the 'rodent' rows
    genus = subset(lila, tmp_path, "--taxon", "order=rodentia", "--label-rank", "order", "--no-download")
    assert genus.returncode == 0, genus.stderr
    assert {c["name"] for c in json.loads((tmp_path / "subset" / CCT).read_text())["categories"]} == {"rodentia"}
    assert not (tmp_path / "subset" / "images").exists()


def test_caps_are_seeded_and_places_select_datasets(lila: MiniLila, tmp_path: Path) -> None:
    def chosen(seed: str) -> list[str]:
        result = subset(lila, tmp_path, "--taxon", "rattus rattus", "--max-per-class", "3", "--seed", seed, "--no-download", "--no-boxes")
        assert result.returncode == 0, result.stderr
        return [i["id"] for i in json.loads((tmp_path / "subset" / CCT).read_text())["images"]]

    first = chosen("1")
    assert len(first) == 3 and chosen("1") == first
    assert any(chosen(str(seed)) != first for seed in range(2, 6))
    result = subset(lila, tmp_path, "--taxon", "rattus rattus", "--country", "tanzania", "--no-download", "--no-boxes")
    assert result.returncode == 0, result.stderr
    assert {i["dataset"] for i in json.loads((tmp_path / "subset" / CCT).read_text())["images"]} == {"south"}


def test_dry_run_says_files_and_bytes_and_writes_no_image(lila: MiniLila, tmp_path: Path) -> None:
    result = subset(lila, tmp_path, "--taxon", "deer", "--dry-run")
    assert result.returncode == 0, result.stderr
    cct = json.loads((tmp_path / "subset" / CCT).read_text())
    size = sum(lila.images[i["file_name"]].stat().st_size for i in cct["images"])
    assert f"would fetch {len(cct['images'])} ({size / 1e6:.1f} MB)" in result.stdout
    assert not (tmp_path / "subset" / "images").exists()


def test_killed_download_resumes_losing_nothing_and_fetching_nothing_twice(lila: MiniLila, tmp_path: Path) -> None:
    flags = ["--output-dir", str(tmp_path / "subset"), "--taxon", "rattus rattus", "--threads", "1", *lila_flags(lila, tmp_path / "meta")]
    lila.requests.clear()
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / SUBSET), *flags], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    images = tmp_path / "subset" / "images"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len([p for p in images.rglob("*") if p.suffix.lower() == ".jpg"]) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = {p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}
    fetched_first = [path for path in lila.gets() if path.lower().endswith(".jpg")]
    result = run_entry_point(SUBSET, *flags)
    assert result.returncode == 0, result.stderr
    cct = json.loads((tmp_path / "subset" / CCT).read_text())
    for image in cct["images"]:  # nothing lost, nothing half-written
        assert (images / image["file_name"]).read_bytes() == lila.images[image["file_name"]].read_bytes()
    assert 0 < len(first) < len(cct["images"])
    fetched_second = [path for path in lila.gets() if path.lower().endswith(".jpg")][len(fetched_first):]
    assert not {p.split("/gcp/", 1)[-1] for p in fetched_second} & first  # complete files were not fetched again
    assert f"{len(first)} skipped" in result.stdout


def own_export(tmp_path: Path, per_location: int = 6) -> Path:
    """A user's own CCT with boxes (as an Animl export is): MCT's mouflon at three stations."""
    mct = json.loads((SHARED_DATA / "mct" / "mct_cct.json").read_text())
    (mouflon,) = [c["id"] for c in mct["categories"] if c["name"] == "mouflon"]
    images = {i["id"]: i for i in mct["images"]}
    kept: dict[str, list[dict]] = {}
    for annotation in mct["annotations"]:
        location = images[annotation["image_id"]]["location"]
        if annotation["category_id"] == mouflon and "bbox" in annotation and len(kept.setdefault(location, [])) < per_location:
            kept[location].append(annotation)
    annotations = [a for group in kept.values() for a in group]
    chosen = [images[i] for i in dict.fromkeys(a["image_id"] for a in annotations)]
    path = tmp_path / "own_cct.json"
    path.write_text(json.dumps({"info": {}, "images": chosen, "annotations": annotations,
                                "categories": [{"id": mouflon, "name": "mouflon"}]}))
    return path


@pytest.mark.slow
def test_own_export_and_lila_subset_make_one_dataset_that_trains_and_predicts(lila: MiniLila, tmp_path: Path) -> None:
    """The README's walkthrough: your own boxed CCT and a LILA subset, cropped apart, one dataset, one model."""
    result = subset(lila, tmp_path, "--taxon", "rattus rattus", "--taxon", "deer", "--threads", "4")
    assert result.returncode == 0, result.stderr
    root = tmp_path / "subset"
    lila_clean, own_clean = tmp_path / "lila_clean.json", tmp_path / "own_clean.json"
    crops, dataset = tmp_path / "crops", tmp_path / "ds"
    steps = [
        ("utils/clean_cct.py", root / CCT, lila_clean, "--keep-image-level", "--missing-locations", "sequence"),
        ("utils/crop_detections.py", root / MD, crops / "lila", "--images-dir", root / "images", "--threshold", "0.2",
         "--labels-cct", lila_clean, "--crop-strategy", "square", "--threads", "2", "--max-size", "96"),
        ("utils/clean_cct.py", own_export(tmp_path), own_clean, "--dataset", "own"),
        ("utils/crop_detections.py", own_clean, crops / "own", "--images-dir", SHARED_DATA / "mct" / "images",
         "--crop-strategy", "square", "--threads", "2", "--max-size", "96"),
        ("utils/create_classification_dataset.py", dataset, "--mode", "csv", "cct", "splits", "--crops-dir", crops,
         "--crops-manifest", crops / "lila" / "crops_manifest.csv", crops / "own" / "crops_manifest.csv",
         "--val-frac", "0.2", "--test-frac", "0.2", "--method", "random", "--seed", "0"),
    ]
    for step in steps:
        done = run_entry_point(str(step[0]), *step[1:])
        assert done.returncode == 0, f"{step[0]}: {done.stdout}\n{done.stderr}"
    table = pd.read_csv(dataset / "classification_ds.csv", dtype=str, keep_default_na=False)
    assert set(table["label"]) == {"rattus rattus", "odocoileus virginianus", "mouflon"} and len(table) >= 25
    assert {path.split("/")[0] for path in table["path"]} == {"lila", "own"} and all((crops / p).is_file() for p in table["path"])
    assert set(table.loc[table["label"] == "mouflon", "dataset"]) == {"own"}
    splits = {k: {tuple(p) for p in v} for k, v in json.loads((dataset / "splits.json").read_text()).items()}
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    run_dir = tmp_path / "runs" / "tiny" / "lila"
    run_dir.mkdir(parents=True)
    config = run_dir / "config.yml"
    config.write_text(yaml.safe_dump({"data_root": str(dataset), "crops_dir": str(crops), "architecture": "timm:test_efficientnet",
                                      "pretrained": False, "image_size": 32, "batch_size": 8, "num_epochs": 1, "num_workers": 0,
                                      "comet": "off"}))
    trained = run_entry_point("classifier/train.py", "--config", config)
    assert trained.returncode == 0, trained.stderr
    predicted = run_entry_point("classifier/predict.py", "--config", config, "--checkpoint", "1.pt", "--split", "test")
    assert predicted.returncode == 0, predicted.stderr
    predictions = pd.read_csv(run_dir / "predictions" / "test_1" / "predictions.csv", dtype=str)
    expected = {p for p, d, loc in zip(table["path"], table["dataset"], table["location"]) if (d, loc) in splits["test"]}
    assert set(predictions["path"]) == expected and expected


def test_a_manifest_outside_the_crops_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "crops_manifest.csv").write_text("crop_path,dataset,location,label\na.jpg,d,l,x\n")
    line = one_error_line(run_entry_point("utils/create_classification_dataset.py", tmp_path / "ds", "--crops-dir", tmp_path / "crops",
                                          "--crops-manifest", tmp_path / "elsewhere" / "crops_manifest.csv"))
    assert "not under --crops-dir" in line


# --------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(("flags", "expected"), [
    (["--taxon", "rattus ratus"], "did you mean rattus rattus"),
    (["--taxon", "famly=muridae"], "did you mean family"),
    (["--taxon", "family=muridea"], "did you mean muridae"),
    (["--taxon", "deer", "--dataset", "nort"], "did you mean north"),
    (["--taxon", "deer", "--country", "Tanzanai"], "did you mean tanzania"),
    (["--taxon", "deer", "--max-per-class", "0"], "argument --max-per-class: expected an integer from 1 to"),
    (["--taxon", "bird", "--dataset", "island"], "the selection is empty"),
])
def test_unknown_names_are_one_line_with_the_nearest(lila: MiniLila, tmp_path: Path, flags: list[str], expected: str) -> None:
    line = one_error_line(subset(lila, tmp_path, *flags, "--no-download"))
    assert expected in line
    assert not (tmp_path / "subset" / "images").exists()


def copy_index(lila: MiniLila, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in (DATASETS_FILE, ALL_IMAGES_FILE, "lila-taxonomy-mapping_release.csv"):
        (folder / name).write_bytes((lila.root / name).read_bytes())
    return folder


def test_an_index_missing_a_column_names_the_file_and_column(lila: MiniLila, tmp_path: Path) -> None:
    index = copy_index(lila, tmp_path / "index")
    frame = pd.read_csv(index / DATASETS_FILE, dtype=str, keep_default_na=False).drop(columns=["image_base_url_gcp"])
    frame.to_csv(index / DATASETS_FILE, index=False)
    line = one_error_line(run_entry_point(SUBSET, "--output-dir", tmp_path / "subset", "--taxon", "deer",
                                          *lila_flags(lila, tmp_path / "meta", str(index))))
    assert DATASETS_FILE in line and "'image_base_url_gcp' missing" in line


def test_an_all_images_zip_with_two_files_or_a_missing_column_is_one_line(lila: MiniLila, tmp_path: Path) -> None:
    index = copy_index(lila, tmp_path / "index")
    with zipfile.ZipFile(index / ALL_IMAGES_FILE, "a") as archive:
        archive.writestr("readme.txt", "a second file")
    line = one_error_line(run_entry_point(SUBSET, "--output-dir", tmp_path / "subset", "--taxon", "deer",
                                          *lila_flags(lila, tmp_path / "meta", str(index))))
    assert ALL_IMAGES_FILE in line and "expected one CSV file inside, found 2" in line
    csv_text = zipfile.ZipFile(lila.root / ALL_IMAGES_FILE).read(ALL_IMAGES_FILE.removesuffix(".zip")).decode()
    with zipfile.ZipFile(index / ALL_IMAGES_FILE, "w") as archive:
        archive.writestr(ALL_IMAGES_FILE.removesuffix(".zip"), csv_text.replace("location_id", "place", 1))
    line = one_error_line(run_entry_point(SUBSET, "--output-dir", tmp_path / "subset", "--taxon", "deer",
                                          *lila_flags(lila, tmp_path / "meta2", str(index))))
    assert "'location_id' missing" in line and not (tmp_path / "meta2" / PARQUET_FILE).exists()


def test_an_interrupted_or_spoiled_conversion_is_never_trusted(lila: MiniLila, tmp_path: Path) -> None:
    assert subset(lila, tmp_path, "--taxon", "deer", "--no-download", "--no-boxes").returncode == 0
    parquet, zipped = tmp_path / "meta" / PARQUET_FILE, tmp_path / "meta" / ALL_IMAGES_FILE
    assert is_converted(zipped, parquet)
    parquet.write_bytes(parquet.read_bytes()[: parquet.stat().st_size // 2])  # as a crash mid-write would, were it not atomic
    assert not is_converted(zipped, parquet)
    result = subset(lila, tmp_path, "--taxon", "deer", "--no-download", "--no-boxes")
    assert result.returncode == 0 and "converting" in result.stderr and is_converted(zipped, parquet)
    assert not list((tmp_path / "meta").glob(".*.tmp"))


def test_a_file_name_with_dot_dot_is_refused_and_an_html_page_is_a_listed_failure(lila: MiniLila, tmp_path: Path) -> None:
    index = copy_index(lila, tmp_path / "index")
    name = ALL_IMAGES_FILE.removesuffix(".zip")
    rows = zipfile.ZipFile(index / ALL_IMAGES_FILE).read(name).decode().splitlines()
    deer = next(i for i, row in enumerate(rows) if ",deer," in row and "/gcp/north-unzipped/" in row)
    evil = rows[deer].replace("/gcp/north-unzipped/", "/gcp/north-unzipped/../../")
    with zipfile.ZipFile(index / ALL_IMAGES_FILE, "w") as archive:
        archive.writestr(name, "\n".join([*rows[:deer], evil, *rows[deer + 1:]]) + "\n")
    line = one_error_line(run_entry_point(SUBSET, "--output-dir", tmp_path / "subset", "--taxon", "deer",
                                          *lila_flags(lila, tmp_path / "meta", str(index))))
    assert "'..'" in line
    # an HTML page where an image should be: the run goes on, the file is listed as failed, exit code 1
    target = next(p for p in (lila.root / "gcp" / "south-images").rglob("*.JPG"))
    original = target.read_bytes()
    target.unlink()
    target.write_bytes(b"<html><body>Sign in to continue</body></html>")
    try:
        result = subset(lila, tmp_path, "--taxon", "deer", "--taxon", "rattus rattus", "--dataset", "south")
    finally:
        target.unlink()
        target.write_bytes(original)
    assert result.returncode == 1, result.stderr
    failures = pd.read_csv(tmp_path / "subset" / "images" / "download_failures.csv", dtype=str)
    assert list(failures["file_name"]) == [f"south-images/{target.relative_to(lila.root / 'gcp' / 'south-images').as_posix()}"]
    assert "not an image" in failures["reason"][0]


def test_one_dataset_cct_metadata(lila: MiniLila, tmp_path: Path) -> None:
    result = run_entry_point("utils/download_lila_dataset_cct.py", "--dataset", "North Camera Traps", "--output-dir", tmp_path / "out",
                             *lila_flags(lila, tmp_path / "meta"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "north.json").read_text())["images"][0]["file_name"] == "all/x.jpg"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["north.json"]
    line = one_error_line(run_entry_point("utils/download_lila_dataset_cct.py", "--dataset", "Nort Camera Traps", "--output-dir",
                                          tmp_path / "out", *lila_flags(lila, tmp_path / "meta")))
    assert "did you mean north camera traps" in line


def test_locations_of_a_taxon_and_what_else_lives_there(lila: MiniLila, tmp_path: Path) -> None:
    output = tmp_path / "locations.csv"
    result = run_entry_point("utils/find_lila_locations.py", "--taxon", "black rat", "--output", output, *lila_flags(lila, tmp_path / "meta"))
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(output, keep_default_na=False)
    places = set(table.loc[table["is_target"], "location"])
    assert {place.split("/")[0] for place in places} == {"north", "south", "island"}
    assert set(table["location"]) == places  # only locations that hold the target
    assert "odocoileus virginianus" in set(table.loc[~table["is_target"], "label"])
    north = table[table["location"] == "north/cam00"]
    assert set(north["label"]) >= {"rattus rattus", "rodent"}  # a coarser label keeps its own name


def test_megadetector_results_written_with_another_path_prefix_still_join(lila: MiniLila, tmp_path: Path) -> None:
    """Results files whose ``file`` carries the dataset's folder (or a drive's path) match by a unique path suffix."""
    results = lila.root / "md-results" / "island_mdv5a_results_raw.zip"
    original = results.read_bytes()
    with zipfile.ZipFile(results) as archive:
        (name,) = archive.namelist()
        data = json.loads(archive.read(name))
    data["images"] = [{**entry, "file": f"D:\\lila\\island\\{entry['file']}"} for entry in data["images"]]
    results.unlink()
    with zipfile.ZipFile(results, "w") as archive:
        archive.writestr(name, json.dumps(data))
    try:
        result = subset(lila, tmp_path, "--taxon", "deer", "--dataset", "island", "--no-download")
    finally:
        results.write_bytes(original)
    assert result.returncode == 0, result.stderr
    cct = json.loads((tmp_path / "subset" / CCT).read_text())
    md = json.loads((tmp_path / "subset" / MD).read_text())
    assert sorted(e["file"] for e in md["images"]) == sorted(i["file_name"] for i in cct["images"]) and md["images"]


@pytest.mark.parametrize("spoil", ["images first", "cut short"])
def test_megadetector_results_are_read_as_a_stream_in_any_key_order(lila: MiniLila, tmp_path: Path, spoil: str) -> None:
    """MegaDetector writes images before detection_categories and info; a results file cut short is one line."""
    results = lila.root / "md-results" / "north_mdv5a_results_raw.zip"
    original = results.read_bytes()
    with zipfile.ZipFile(results) as archive:
        (name,) = archive.namelist()
        data = json.loads(archive.read(name))
    text = json.dumps({"images": data["images"], "detection_categories": data["detection_categories"], "info": data["info"]})
    results.unlink()
    with zipfile.ZipFile(results, "w") as archive:
        archive.writestr(name, text if spoil == "images first" else text[: len(text) // 2])
    try:
        result = subset(lila, tmp_path, "--taxon", "deer", "--dataset", "north", "--no-download")
    finally:
        results.write_bytes(original)
    if spoil == "cut short":
        assert "north.mdv5a_results_raw.zip: not a MegaDetector JSON file" in one_error_line(result)
        return
    assert result.returncode == 0, result.stderr
    md = json.loads((tmp_path / "subset" / MD).read_text())
    assert md["detection_categories"] == data["detection_categories"] and md["info"]["detector"] == data["info"]["detector"]
    assert len(md["images"]) == len(json.loads((tmp_path / "subset" / CCT).read_text())["images"]) > 0


def test_cloud_chooses_the_urls_downloaded_and_every_cloud_is_recorded(lila: MiniLila, tmp_path: Path) -> None:
    lila.requests.clear()
    result = run_entry_point(SUBSET, "--output-dir", tmp_path / "subset", "--taxon", "deer", "--dataset", "south", "--cloud", "azure",
                             *lila_flags(lila, tmp_path / "meta"))
    assert result.returncode == 0, result.stderr
    cct = json.loads((tmp_path / "subset" / CCT).read_text())
    for image in cct["images"]:
        path = image["file_name"].removeprefix("south-images/")
        assert image["url"] == image["url_azure"] == f"{lila.url}/azure/south-images/{path}"
        assert image["url_gcp"] == f"{lila.url}/gcp/south-images/{path}" and image["url_aws"] == f"{lila.url}/aws/south-images/{path}"
    images = [path for path in lila.gets() if path.lower().endswith(".jpg")]
    assert len(images) == len(cct["images"]) and all(path.startswith("/azure/") for path in images)
    assert all((tmp_path / "subset" / "images" / i["file_name"]).is_file() for i in cct["images"])


def test_the_subset_validates_and_combines_with_your_own_export(lila: MiniLila, tmp_path: Path) -> None:
    """validate_cct.py passes the subset as it is; combine_cct.py joins it with a user's own CCT, every image kept apart."""
    assert subset(lila, tmp_path, "--taxon", "rattus rattus", "--no-download", "--no-boxes").returncode == 0
    cct = tmp_path / "subset" / CCT
    checked = run_entry_point("utils/validate_cct.py", cct)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    own = own_export(tmp_path, per_location=2)
    combined = tmp_path / "combined.json"
    result = run_entry_point("utils/combine_cct.py", combined, own, cct, "--names", "own", "lila")
    assert result.returncode == 0, result.stderr
    data = json.loads(combined.read_text())
    sources = json.loads(cct.read_text()), json.loads(own.read_text())
    assert len(data["images"]) == sum(len(source["images"]) for source in sources)
    assert {c["name"] for c in data["categories"]} == {"rattus rattus", "mouflon"}
    assert len({image["id"] for image in data["images"]}) == len(data["images"])
