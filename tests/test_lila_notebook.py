"""notebooks/lila_species_locations.ipynb, run as a user runs it (utils/run_notebook.py --set ...) on a served mini-LILA.

What the notebook shows is checked against the served all-images table itself, not against the library
that the notebook calls: where the rats are, how many rat images each place holds, and what else lives there.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import nbformat
import pytest

from classification.data.lila.index import ALL_IMAGES_FILE
from classification.data.lila.table import PARQUET_FILE
from tests.helpers.notebooks import NOTEBOOKS, cell, outputs_text, png_outputs
from tests.helpers.processes import SHARED_DATA, run_in_process
from tests.mini_lila import DATASETS, MD_TEST, MiniLila, serve_mini_lila

NOTEBOOK = NOTEBOOKS / "lila_species_locations.ipynb"
TARGET = "rattus rattus"  # what "rat", "Rattus rattus" and "black rat" all are, in the fixture's three datasets


@pytest.fixture(scope="module")
def mini_lila(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniLila]:
    """The mini-LILA, served for this module's tests; skipped without the real images it is built from."""
    if not (SHARED_DATA / MD_TEST).is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA / MD_TEST} (a fresh clone without ../shared)")
    served = serve_mini_lila(SHARED_DATA, tmp_path_factory.mktemp("mini_lila"))
    yield next(served)
    served.close()


def served_rows(lila: MiniLila) -> list[dict[str, str]]:
    """The all-images table as the server hands it out."""
    with zipfile.ZipFile(lila.root / ALL_IMAGES_FILE) as archive:
        (name,) = archive.namelist()
        return list(csv.DictReader(io.StringIO(archive.read(name).decode())))


def location_name(row: dict[str, str]) -> str:
    """``<short_name>/<location>``, or ``<short_name>/(no locations)`` for a dataset without them."""
    short = {dataset[0]: dataset[1] for dataset in DATASETS}[row["dataset_name"]]
    if row["location_id"] == row["dataset_name"]:
        return f"{short}/(no locations)"
    return f"{short}/{row['location_id'].split(' : ', 1)[1]}"


def expected_locations(rows: list[dict[str, str]]) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """(location -> (target images, all images)) for the places holding the target, and (class -> (places, images)) there."""
    images: dict[str, set[str]] = defaultdict(set)
    targets: dict[str, set[str]] = defaultdict(set)
    by_class: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows:
        place = location_name(row)
        images[place].add(row["image_id"])
        by_class[place, row["species"] or row["common_name"] or row["original_label"]].add(row["image_id"])
        if row["species"] == TARGET:
            targets[place].add(row["image_id"])
    places = {place: (len(targets[place]), len(images[place])) for place in targets}
    classes: dict[str, tuple[int, int]] = {}
    for (place, label), ids in by_class.items():
        if place in places:
            seen, count = classes.get(label, (0, 0))
            classes[label] = (seen + 1, count + len(ids))
    return places, classes


def table_rows(text: str, names: list[str]) -> dict[str, list[str]]:
    """The cells after the index of each row of a displayed DataFrame whose index is one of ``names``."""
    found = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + " "):
                found[name] = line[len(name):].split()
    return found


def run_notebook_script(output: Path, *parameters: str) -> nbformat.NotebookNode:
    result = run_in_process("utils/run_notebook.py", NOTEBOOK, "--output", output, *[arg for p in parameters for arg in ("--set", p)])
    assert result.returncode == 0, result.stderr
    assert f"-> {output}" in result.stdout
    return nbformat.read(output, as_version=4)


def test_lila_notebook_is_stored_clean_with_lila_defaults() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None and c.metadata.get("tags") for c in code)
    parameters = code[0]
    assert parameters.metadata["tags"] == ["parameters"] and "os.environ.get" in parameters.source
    for default in ("'[\"rattus rattus\"]'", '"INDEX_URL") or None', '"species"', '"TOP", "20"'):
        assert default in parameters.source
    assert "run_notebook.py notebooks/lila_species_locations.ipynb" in notebook.cells[0].source


def test_lila_notebook_shows_where_the_rats_live(mini_lila: MiniLila, kernel_env: None, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLASSIFICATION_LILA_CACHE", str(tmp_path / "default_cache"))  # must stay untouched: METADATA_DIR wins
    metadata = tmp_path / "lila_metadata"
    notebook = run_notebook_script(tmp_path / "out.ipynb", 'TAXA=["rat"]', f"INDEX_URL={mini_lila.url}", f"METADATA_DIR={metadata}")
    assert (metadata / PARQUET_FILE).is_file() and not (tmp_path / "default_cache").exists()
    assert mini_lila.gets(f"/{ALL_IMAGES_FILE}")

    rows = served_rows(mini_lila)
    places, classes = expected_locations(rows)
    assert len(places) == 8 and {"island/(no locations)", "north/cam00", "south/cam03"} <= set(places)  # the fixture is what we think
    assert f"{len(places)} locations in 3 datasets hold rat" in outputs_text(cell(notebook, "load"))

    shown = outputs_text(cell(notebook, "locations"))
    every_place = sorted({location_name(row) for row in rows}, key=len, reverse=True)
    listed = table_rows(shown, every_place)
    assert set(listed) == set(places)  # every place holding rats, and none other (north/cam03 has only a bird and a blank)
    for place, (target_images, location_images) in places.items():
        assert listed[place][:2] == [str(target_images), str(location_images)], place
    order = [line.split("  ")[0] for line in shown.splitlines() if line.split("  ")[0] in places]
    assert order[0] == "island/(no locations)"  # most rat images first (5 of its 10)

    pivot = table_rows(outputs_text(cell(notebook, "classes")), sorted(classes, key=len, reverse=True))
    assert set(pivot) == set(classes) >= {TARGET, "odocoileus virginianus", "rattus norvegicus", "rodent", "bird", "empty"}
    for label, (seen, images) in classes.items():
        assert pivot[label] == [str(label == TARGET), str(seen), str(images)], label

    (chart,) = png_outputs(cell(notebook, "top-locations-plot"))
    assert chart.width > 300 and chart.height > 150
    assert cast("tuple[int, int]", chart.convert("L").getextrema())[0] < 100  # bars drawn, not a blank canvas


def test_lila_notebook_names_an_unknown_taxon_in_one_line(mini_lila: MiniLila, kernel_env: None, tmp_path: Path) -> None:
    result = run_in_process("utils/run_notebook.py", NOTEBOOK, "--output", tmp_path / "out.ipynb", "--set", "TAXA=ratt",
                            "--set", f"INDEX_URL={mini_lila.url}", "--set", f"METADATA_DIR={tmp_path / 'lila_metadata'}")
    assert result.returncode != 0 and not (tmp_path / "out.ipynb").exists()
    *_, line = result.stderr.strip().splitlines()  # after nbclient's "Executing notebook" log line
    assert "Traceback" not in result.stderr and line.startswith("error: ") and "a cell failed" in line
    assert "--taxon 'ratt'" in line and "did you mean rat" in line
