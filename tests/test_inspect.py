"""classification.data.inspect on a dataset built by the real pipeline: demo data -> clean -> crop -> dataset."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle
from PIL import Image

from classification.data.cct import load_cct, normalize_location, validate_cct
from classification.data.clean import build_category_map
from classification.data.inspect import (
    NO_LOCATION,
    category_summary,
    class_counts_by_split,
    class_fractions_by_split,
    edit_category_map,
    load_dataset,
    location_summary,
    location_table,
    locations_by_split,
    plot_class_counts,
    plot_locations_by_split,
    plot_sample_grid,
    problem_summary,
    read_thumbnail,
    sample_crops,
)
from classification.data.splits import SPLIT_NAMES
from classification.errors import DataError, UserError
from tests.helpers.demo import DemoData, build_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    return build_demo_dataset(tmp_path_factory.mktemp("inspect_demo"))


def split_of_location(dataset_dir: Path) -> dict[tuple[str, str], str]:
    """(dataset, location) -> split, straight from splits.json."""
    splits = json.loads((dataset_dir / "splits.json").read_text())
    return {(d, loc): name for name in SPLIT_NAMES for d, loc in splits[name]}


def raw_csv(dataset_dir: Path) -> pd.DataFrame:
    return pd.read_csv(dataset_dir / "classification_ds.csv", dtype=str, keep_default_na=False)


def test_every_crop_gets_exactly_one_split(demo: DemoData) -> None:
    view = load_dataset(demo.dataset_dir)
    csv = raw_csv(demo.dataset_dir)
    assert view.crops["path"].tolist() == csv["path"].tolist()
    assert view.crops["split"].notna().all()
    splits = json.loads((demo.dataset_dir / "splits.json").read_text())
    for row in view.crops.itertuples():
        holders = [name for name in SPLIT_NAMES if [row.dataset, row.location] in splits[name]]
        assert holders == [row.split]
    per_location = view.crops.groupby(["dataset", "location"], observed=True)["split"].nunique()
    assert (per_location == 1).all()
    assert view.labels == [v for _, v in sorted(json.loads((demo.dataset_dir / "label_index.json").read_text()).items(),
                                                 key=lambda kv: int(kv[0]))]
    assert view.split_report is not None and "score" in view.split_report


def test_class_counts_equal_the_csv_and_the_split_report(demo: DemoData) -> None:
    view = load_dataset(demo.dataset_dir)
    assert view.split_report is not None
    counts = class_counts_by_split(view)
    csv = raw_csv(demo.dataset_dir)
    split_of = split_of_location(demo.dataset_dir)
    expected = Counter((label, split_of[(d, loc)]) for label, d, loc in zip(csv["label"], csv["dataset"], csv["location"]))
    assert list(counts.index) == view.labels
    assert list(counts.columns) == [*SPLIT_NAMES, "total"]
    for label in view.labels:
        for split in SPLIT_NAMES:
            assert counts.loc[label, split] == expected[(label, split)]
            assert counts.loc[label, split] == view.split_report["classes"][label][split]["n_crops"]
        assert counts.loc[label, "total"] == (csv["label"] == label).sum()
    assert counts["total"].sum() == len(csv)
    fractions = class_fractions_by_split(view)
    assert np.allclose(fractions.loc[view.labels, list(SPLIT_NAMES)].sum(axis=1), 1.0, atol=0.002)
    assert fractions.loc["(target)"].tolist() == [view.split_report["targets"][s] for s in SPLIT_NAMES]


def test_locations_and_crops_per_split(demo: DemoData) -> None:
    view = load_dataset(demo.dataset_dir)
    assert view.split_report is not None
    table = locations_by_split(view)
    csv = raw_csv(demo.dataset_dir)
    split_of = split_of_location(demo.dataset_dir)
    used = set(zip(csv["dataset"], csv["location"]))
    assert list(table.index) == list(SPLIT_NAMES)
    assert table["n_crops"].sum() == len(csv)
    for split in SPLIT_NAMES:
        assert table.loc[split, "n_locations"] == sum(1 for key in used if split_of[key] == split)
        assert table.loc[split, "n_locations"] == view.split_report["splits"][split]["n_locations"]
        assert table.loc[split, "n_crops"] == view.split_report["splits"][split]["n_crops"]
        assert table.loc[split, "target"] == view.split_report["targets"][split]
    locations = location_table(view)
    assert len(locations) == len(used)
    assert locations["n_crops"].sum() == len(csv)
    assert all(split_of[(r.dataset, r.location)] == r.split for r in locations.itertuples())


def test_load_dataset_keeps_locations_as_strings_and_rejects_inconsistent_files(tmp_path: Path) -> None:
    pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"], "dataset": ["d", "d", "d"], "location": ["007", "7", "010"],
                  "dataset_class": ["x", "y", "x"], "confidence": ["1.0"] * 3, "label": ["x", "y", "x"]}
                 ).to_csv(tmp_path / "classification_ds.csv", index=False)
    (tmp_path / "label_index.json").write_text('{"0": "x", "1": "y"}')
    (tmp_path / "splits.json").write_text(json.dumps({"train": [["d", "007"]], "val": [["d", "7"]], "test": [["d", "010"]]}))
    view = load_dataset(tmp_path)
    assert view.crops["location"].tolist() == ["007", "7", "010"]
    assert view.crops["split"].tolist() == ["train", "val", "test"]
    assert view.split_report is None
    assert locations_by_split(view)["target"].isna().all()

    (tmp_path / "splits.json").write_text(json.dumps({"train": [["d", "007"]], "val": [["d", "7"]], "test": []}))
    with pytest.raises(DataError, match="in no split"):
        load_dataset(tmp_path)
    (tmp_path / "splits.json").unlink()
    view = load_dataset(tmp_path)  # a dataset built with --mode csv only: counts without splits
    assert view.crops["split"].isna().all()
    counts = class_counts_by_split(view)
    assert counts["total"].tolist() == [2, 1] and counts[list(SPLIT_NAMES)].to_numpy().sum() == 0
    assert locations_by_split(view)[["n_locations", "n_crops"]].to_numpy().sum() == 0
    (tmp_path / "label_index.json").write_text('{"0": "x"}')
    with pytest.raises(DataError, match="not in label_index.json: y"):
        load_dataset(tmp_path)


def test_sample_grid_shows_per_class_real_crops_when_available(demo: DemoData) -> None:
    view = load_dataset(demo.dataset_dir)
    totals = view.crops["label"].value_counts()
    per_class = int(totals.max())  # every class but the biggest has fewer: rows are partly empty
    assert totals.min() < per_class
    figure = plot_sample_grid(view, demo.crops_dir, per_class=per_class, seed=1)
    axes = np.array(figure.axes).reshape(len(view.labels), per_class)
    samples = sample_crops(view, per_class, seed=1)
    for label, row in zip(view.labels, axes):
        assert row[0].get_ylabel().startswith(label)
        assert sum(len(ax.images) for ax in row) == min(per_class, totals[label])
        first = samples[samples["label"] == label].iloc[0]
        pixels = np.asarray(row[0].images[0].get_array())
        assert np.array_equal(pixels, np.asarray(read_thumbnail(demo.crops_dir / first["path"])))
        assert pixels.ndim == 3 and pixels.std() > 5  # a decoded picture, not a blank cell
        assert first["split"] in row[0].get_title()


def test_sample_crops_are_seeded_and_spread_over_locations(demo: DemoData) -> None:
    view = load_dataset(demo.dataset_dir)
    first, again = sample_crops(view, 3, seed=5), sample_crops(view, 3, seed=5)
    assert first["path"].tolist() == again["path"].tolist()
    assert first["path"].is_unique
    for label, picked in first.groupby("label"):
        n_locations = len(view.crops.loc[view.crops["label"] == label, ["dataset", "location"]].drop_duplicates())
        assert len(picked[["dataset", "location"]].drop_duplicates()) == min(3, n_locations, len(picked))


def test_sample_grid_marks_a_missing_crop_and_goes_on(demo: DemoData) -> None:
    view = load_dataset(demo.dataset_dir)
    crops = view.crops.copy()
    crops.loc[crops.index[0], "path"] = "gone/missing.jpg"
    label = crops.loc[crops.index[0], "label"]
    n = int((crops["label"] == label).sum())
    figure = plot_sample_grid(replace(view, crops=crops), demo.crops_dir, per_class=n, classes=[label])
    assert sum(len(ax.images) for ax in figure.axes) == n - 1
    assert any("unreadable" in text.get_text() for ax in figure.axes for text in ax.texts)
    with pytest.raises(UserError, match="not in the dataset"):
        plot_sample_grid(view, demo.crops_dir, classes=["unicorn"])


def bars(axis: Axes) -> list[Rectangle]:
    """The bars of a bar plot: its patches, every one a rectangle."""
    found = [patch for patch in axis.patches if isinstance(patch, Rectangle)]
    assert len(found) == len(axis.patches)
    return found

def test_bar_plots_draw_the_counts(demo: DemoData) -> None:
    view = load_dataset(demo.dataset_dir)
    counts = class_counts_by_split(view)
    ax = plot_class_counts(view)
    assert [tick.get_text() for tick in ax.get_yticklabels()] == view.labels
    widths: defaultdict[int, float] = defaultdict(float)
    for patch in bars(ax):
        widths[round(patch.get_y() + patch.get_height() / 2)] += patch.get_width()
    assert [widths[i] for i in range(len(view.labels))] == counts["total"].tolist()
    figure = plot_locations_by_split(view)
    heights = [[patch.get_height() for patch in bars(axis)] for axis in figure.axes]
    table = locations_by_split(view)
    assert heights == [table["n_locations"].tolist(), table["n_crops"].tolist()]


def test_category_and_location_summaries_of_a_raw_cct(demo: DemoData) -> None:
    raw = json.loads(demo.raw_cct.read_text())
    names = {c["id"]: c["name"] for c in raw["categories"]}
    categories = category_summary(raw)
    assert dict(zip(categories["name"], categories["n_annotations"])) == Counter(names[a["category_id"]] for a in raw["annotations"])
    assert categories["n_annotations"].is_monotonic_decreasing
    location_of = {i["id"]: normalize_location(i.get("location")) for i in raw["images"]}
    for row in categories.itertuples():
        named = {location_of[a["image_id"]] for a in raw["annotations"] if names[a["category_id"]] == row.name} - {None}
        assert row.n_locations == len(named)

    locations = location_summary(raw)
    assert locations["n_images"].sum() == len(raw["images"])
    assert locations["n_annotations"].sum() == len(raw["annotations"])
    missing = sum(1 for i in raw["images"] if normalize_location(i.get("location")) is None)
    assert missing > 0 and locations.iloc[-1]["location"] == NO_LOCATION and locations.iloc[-1]["n_images"] == missing
    assert locations.iloc[-1]["missing"] and not locations.iloc[:-1]["missing"].any()
    assert "site_01" in set(locations["location"])  # "Site 01", normalised

    clean = location_summary(load_cct(demo.clean_cct))  # the sequence rule gave each group a name
    assert NO_LOCATION not in set(clean["location"]) and set(clean["dataset"]) == {"demo"}
    assert clean["n_images"].sum() == len(raw["images"])


def test_problem_summary_groups_by_field_errors_first(demo: DemoData) -> None:
    raw = json.loads(demo.raw_cct.read_text())
    raw["annotations"][0]["bbox"][2] = -5
    raw["annotations"][3]["bbox"][3] = -1
    table = problem_summary(validate_cct(raw))
    assert table.iloc[0]["severity"] == "error" and table.iloc[0]["field"] == "annotations[*].bbox"
    assert table.iloc[0]["count"] == 2 and "annotations[0].bbox: width is negative" in table.iloc[0]["example"]
    warnings = table[table["severity"] == "warning"].set_index("field")
    assert warnings.loc["images[*].location", "count"] == 4
    assert problem_summary([]).empty


def test_edit_category_map_drops_converts_and_rejects_typos(demo: DemoData) -> None:
    rows = build_category_map([load_cct(demo.raw_cct)])
    edited = edit_category_map(rows, drop=["bird"], convert={"wild_boar": "boar"})
    by_name = {row["name"]: row for row in edited}
    assert by_name["bird"]["keep"] is False and by_name["wild_boar"]["convert_to"] == "boar"
    assert by_name["deer"] == {**by_name["deer"], "keep": True, "convert_to": None}
    assert all(row["keep"] and row["convert_to"] is None for row in rows)  # the input is not changed
    with pytest.raises(UserError, match="'wildboar' is not in the category map \\(did you mean 'wild_boar'\\?\\)"):
        edit_category_map(rows, convert={"wildboar": "boar"})


def test_thumbnail_is_small_rgb(demo: DemoData) -> None:
    path = next(demo.crops_dir.rglob("*.jpg"))
    thumb = read_thumbnail(path, size=32)
    assert thumb.mode == "RGB" and max(thumb.size) <= 32
    with Image.open(path) as image:
        assert thumb.size[0] / thumb.size[1] == pytest.approx(image.size[0] / image.size[1], rel=0.1)
