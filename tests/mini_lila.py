"""A mini-LILA served over HTTP on 127.0.0.1, laid out as LILA lays out its files.

Three datasets hold the 31 real LILA images of ``../shared/data/lila_md_test`` under their own folders
and locations, with their real MegaDetector v5a boxes as each dataset's zipped results file. The index
files have LILA's names and columns: the datasets index (URLs pointing at this server, one folder per
cloud), the zipped all-images table and the taxonomy mapping. The labels are the fixture's own: one
rat species under three names in three datasets ("rat", "Rattus rattus", "black rat"), others at
species and coarser levels, blanks, and one image holding two species.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import zipfile
from collections.abc import Generator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from classification.data.lila.index import ALL_IMAGES_COLUMNS, ALL_IMAGES_FILE, CLOUDS, DATASETS_FILE, RANKS, TAXONOMY_FILE

MD_TEST = "lila_md_test"

# (name, short_name, folder, country, continent, region, has locations, MegaDetector results column)
DATASETS = [
    ("North Camera Traps", "north", "north-unzipped", "USA", "North America", "Idaho", True, "mdv5a_results_raw"),
    ("South Camera Traps", "south", "south-images", "South Africa, Tanzania", "Africa", "Karoo", True, "mdv5b_results_raw"),
    ("Island Camera Traps", "island", "island", "Palau", "Oceania", "Micronesia", False, "mdv5a_results_raw"),
]

# taxonomy: query -> (scientific_name, common_name, {rank: value})
RAT = {"kingdom": "animalia", "class": "mammalia", "order": "rodentia", "family": "muridae", "genus": "rattus", "species": "rattus rattus"}
TAXA = {
    "rat": ("rattus rattus", "black rat", RAT),
    "rattus rattus": ("rattus rattus", "black rat", RAT),
    "black rat": ("rattus rattus", "black rat", RAT),
    "norway rat": ("rattus norvegicus", "brown rat", {**RAT, "species": "rattus norvegicus"}),
    "deer": ("odocoileus virginianus", "white-tailed deer",
             {"kingdom": "animalia", "class": "mammalia", "order": "artiodactyla", "family": "cervidae", "genus": "odocoileus",
              "species": "odocoileus virginianus"}),
    "rodent": ("rodentia", "rodent", {"kingdom": "animalia", "class": "mammalia", "order": "rodentia"}),
    "bird": ("aves", "bird", {"kingdom": "animalia", "class": "aves"}),
    "empty": ("", "empty", {}),
}
# each dataset's labels, cycled over its images (the second image of north also holds a deer)
LABELS = {"north": ["rat", "deer", "rat", "empty", "rodent", "deer", "rat", "bird", "deer", "rat", "empty"],
          "south": ["rattus rattus", "deer", "norway rat", "rattus rattus", "deer", "empty", "rattus rattus", "deer", "bird",
                    "rattus rattus"],
          "island": ["black rat", "black rat", "deer", "empty", "black rat", "deer", "black rat", "norway rat", "deer", "black rat"]}


@dataclass
class MiniLila:
    """The served mini-LILA: its root folder, URL, and what the tests need to check against."""

    root: Path
    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)  # the subset's file_name -> the source image

    def gets(self, prefix: str = "") -> list[str]:
        return [path for method, path in self.requests if method == "GET" and path.startswith(prefix)]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _zip(path: Path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)


def _dataset_row(dataset: tuple, base: str) -> dict[str, str]:
    name, short, folder, country, continent, region, _, md_column = dataset
    row = {"name": name, "short_name": short, "continent": continent, "country": country, "region": region,
           "image_base_url_relative": folder, "metadata_url_relative": f"{folder}/{short}.json.zip", "bbox_url_relative": ""}
    for cloud in CLOUDS:
        row[f"image_base_url_{cloud}"] = f"{base}/{cloud}/{folder}"
        row[f"metadata_url_{cloud}"] = f"{base}/{cloud}/{folder}/{short}.json.zip"
        row[f"bbox_url_{cloud}"] = ""
    for column in ("mdv5a_results_raw", "mdv5b_results_raw", "md1000-redwood_results_raw", "md_results_with_rde"):
        row[column] = f"{base}/md-results/{short}_{column}.zip" if column == md_column else ""
    return row


def _label_row(dataset: tuple, base: str, path: str, index: int, query: str, location: str) -> list[str]:
    name, short, folder, *_ = dataset
    scientific, common, ranks = TAXA[query]
    has_locations = dataset[6]
    values = {
        "dataset_name": name, **{f"url_{cloud}": f"{base}/{cloud}/{folder}/{path}" for cloud in CLOUDS},
        "image_id": f"{name} : {short}{index:03d}", "sequence_id": f"{name} : seq{index // 2}" if has_locations else f"{name} : unknown",
        "location_id": f"{name} : {location}" if has_locations else name, "frame_num": str(index % 2 if has_locations else -1),
        "original_label": query, "scientific_name": scientific, "common_name": common,
        "datetime": f"06-{1 + index:02d}-2019 12:{index:02d}:00" if index % 4 else "", "annotation_level": "image",
    }
    return [values.get(column, ranks.get(column, "")) for column in [*ALL_IMAGES_COLUMNS, *RANKS]]


def build_mini_lila(shared_data: Path, root: Path, base: str) -> MiniLila:
    """Lay out the mini-LILA under ``root`` with URLs under ``base``; returns what was laid out."""
    source = shared_data / MD_TEST
    md = json.loads((source / "md_v5a_output.json").read_text())
    by_file = {entry["file"]: entry for entry in md["images"]}
    files = sorted(path.name for path in (source / "images").iterdir())
    lila = MiniLila(root=root)
    label_rows: list[list[str]] = []
    for d, dataset in enumerate(DATASETS):
        short, folder = dataset[1], dataset[2]
        mine = files[d::3]
        md_images = []
        for index, file in enumerate(mine):
            location = f"cam{index % 4:02d}"
            path = f"{location}/{file}" if dataset[6] else f"all/{file}"
            target = root / "gcp" / folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(source / "images" / file, target)
            lila.images[f"{folder}/{path}"] = source / "images" / file
            labels = LABELS[short]
            label_rows.append(_label_row(dataset, base, path, index, labels[index % len(labels)], location))
            if short == "north" and index == 1:
                label_rows.append(_label_row(dataset, base, path, index, "rat", location))
            md_images.append({**by_file[file], "file": path.replace("/", "\\") if short == "south" else path})
        (root / "md-results").mkdir(exist_ok=True)
        _zip(root / "md-results" / f"{short}_{dataset[7]}.zip", f"{short}_{dataset[7]}.json",
             json.dumps({**md, "images": md_images}).encode())
        _zip(root / "gcp" / folder / f"{short}.json.zip", f"{short}.json",
             json.dumps({"info": {}, "images": [{"id": "x", "file_name": "all/x.jpg"}], "annotations": [], "categories": []}).encode())
    for cloud in CLOUDS[1:]:
        (root / cloud).symlink_to(root / "gcp", target_is_directory=True)
    rows = [_dataset_row(dataset, base) for dataset in DATASETS]
    header = list(rows[0])
    _write_csv(root / DATASETS_FILE, header, [list(row.values()) for row in rows] + [[""] * len(header)])
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow([*ALL_IMAGES_COLUMNS, *RANKS])
    writer.writerows(label_rows)
    _zip(root / ALL_IMAGES_FILE, ALL_IMAGES_FILE.removesuffix(".zip"), table.getvalue().encode())
    taxonomy = [[dataset[0], query, "species", scientific, common, "", *[ranks.get(rank, "") for rank in RANKS]]
                for dataset in DATASETS for query, (scientific, common, ranks) in TAXA.items()]
    _write_csv(root / TAXONOMY_FILE, ["dataset_name", "query", "taxonomy_level", "scientific_name", "common_name", "taxonomy_string",
                                      *RANKS], taxonomy)
    return lila


def _place(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows it (the images are MBs each), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())


class _Handler(SimpleHTTPRequestHandler):
    lila: MiniLila

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.lila.requests.append(("GET", self.path))
        super().do_GET()

    def do_HEAD(self) -> None:
        self.lila.requests.append(("HEAD", self.path))
        super().do_HEAD()


def serve_mini_lila(shared_data: Path, root: Path) -> Generator[MiniLila, None, None]:
    """Build and serve a mini-LILA on 127.0.0.1 until the generator is closed."""
    root.mkdir(parents=True, exist_ok=True)
    lila = MiniLila(root=root)
    handler = type("Handler", (_Handler,), {"lila": lila})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    built = build_mini_lila(shared_data, root, base)
    lila.images, lila.url = built.images, base
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield lila
    finally:
        server.shutdown()
        server.server_close()
