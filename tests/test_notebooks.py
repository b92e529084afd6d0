"""Both notebooks run headless (nbclient, cwd notebooks/) on data the test builds, and show what they should."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from classification.data.cct import load_cct
from classification.demo import make_demo_dataset
from tests.helpers.demo import build_demo_dataset
from tests.helpers.notebooks import NOTEBOOKS, cell, outputs_text, png_outputs, run_notebook
from tests.helpers.processes import REPO_ROOT

NAMES = ("clean_and_combine_datasets.ipynb", "inspect_dataset.ipynb")


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_stored_clean_with_demo_defaults(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    parameters = code[0]
    assert "parameters" in parameters.metadata.get("tags", []) and "os.environ.get" in parameters.source
    demo_sh = (REPO_ROOT / "demo.sh").read_text()
    for default in ("data/raw/demo", "data/interim/demo", "data/processed/demo"):
        assert default in demo_sh  # the notebooks' defaults are what ./demo.sh writes
    if name == "inspect_dataset.ipynb":
        assert '"../data/processed/demo"' in parameters.source and '"../data/interim/demo/crops"' in parameters.source
    else:
        assert '"../data/raw/demo/demo_cct.json"' in parameters.source


def test_inspect_notebook_runs_headless(kernel_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = build_demo_dataset(tmp_path / "demo")
    monkeypatch.setenv("DATASET_DIR", str(demo.dataset_dir))
    monkeypatch.setenv("CROPS_DIR", str(demo.crops_dir))
    monkeypatch.setenv("PER_CLASS", "4")
    notebook = run_notebook("inspect_dataset.ipynb")

    labels = list(json.loads((demo.dataset_dir / "label_index.json").read_text()).values())
    counts = outputs_text(cell(notebook, "class-counts"))
    assert all(label in counts for label in labels) and "train" in counts and "total" in counts
    assert "crops" in outputs_text(cell(notebook, "load"))
    assert "n_locations" in outputs_text(cell(notebook, "locations"))
    assert "score" in outputs_text(cell(notebook, "split-report"))
    for tag in ("class-counts-plot", "locations-plot"):
        assert len(png_outputs(cell(notebook, tag))) == 1
    (grid,) = png_outputs(cell(notebook, "sample-grid"))
    assert grid.width > 300 and grid.height > 100 * len(labels) // 2
    low, high = cast("tuple[int, int]", grid.convert("L").getextrema())  # one band: (min, max)
    assert high - low > 100  # real pictures, not blank


def test_clean_notebook_combines_two_datasets_with_edits(kernel_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [make_demo_dataset(tmp_path / name, n_locations=3, sequences_per_location=2, frames_per_sequence=2, seed=seed)
             for seed, name in enumerate(("a", "b"))]
    output = tmp_path / "out"
    monkeypatch.setenv("CCT_FILES", ":".join(map(str, files)))
    monkeypatch.setenv("DATASET_NAMES", "a,b")
    monkeypatch.setenv("OUTPUT_DIR", str(output))
    monkeypatch.setenv("PREFIX_FILE_NAMES", "1")
    monkeypatch.setenv("DROP_CATEGORIES", "bird")
    monkeypatch.setenv("CONVERT_CATEGORIES", "wild_boar:boar")
    notebook = run_notebook("clean_and_combine_datasets.ipynb")

    assert "images[*].location" in outputs_text(cell(notebook, "validate"))
    assert "(no location)" in outputs_text(cell(notebook, "locations"))
    assert "wild_boar" in outputs_text(cell(notebook, "categories"))
    category_map = {row["name"]: row for row in json.loads((output / "category_map.json").read_text())}
    assert category_map["bird"]["keep"] is False and category_map["wild_boar"]["convert_to"] == "boar"
    combined = load_cct(output / "combined_cct.json")
    raws = [json.loads(path.read_text()) for path in files]
    assert {c["name"] for c in combined["categories"]} == {"boar", "deer", "rabbit"}
    assert {image["dataset"] for image in combined["images"]} == {"a", "b"}
    assert len(combined["images"]) == sum(len(raw["images"]) for raw in raws)  # no image lost to a missing location
    assert all(image["location"] and image["file_name"].split("/")[0] in ("a", "b") for image in combined["images"])
    bird_id = {c["name"]: c["id"] for c in raws[0]["categories"]}["bird"]
    birds = sum(1 for raw in raws for a in raw["annotations"] if a["category_id"] == bird_id)
    assert len(combined["annotations"]) == sum(len(raw["annotations"]) for raw in raws) - birds
    assert "boar" in outputs_text(cell(notebook, "combine"))


def test_clean_notebook_stops_on_a_bad_file_with_one_line(kernel_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad_cct.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg", "width": 10, "height": 10, "location": "a"}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, -3, 4]}],
                               "categories": [{"id": 1, "name": "deer"}]}))
    monkeypatch.setenv("CCT_FILES", str(bad))
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "out"))
    with pytest.raises(CellExecutionError, match=r"annotations\[0\]\.bbox: width is negative"):
        run_notebook("clean_and_combine_datasets.ipynb")
    assert not (tmp_path / "out" / "combined_cct.json").exists()
