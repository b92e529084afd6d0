"""LILA's all-images table at LILA scale: Parquet + DuckDB (this library) against pandas (MegaDetector's way).

It makes a synthetic all-images CSV with LILA's real columns (``ALL_IMAGES_COLUMNS`` and the 20
rank columns) and values laid out as LILA's are: 40 datasets one after another (Zipf-like sizes),
each with its own locations (5,000 in all) and its own ~50 labels, sequences of 3 frames, the three
clouds' URLs, 600 species and 60 genus-level labels of a fixed synthetic taxonomy (lower-case,
Zipf-like frequencies), 30% blank rows, ``%m-%d-%Y %H:%M:%S`` datetimes. DuckDB writes it, Python's
``zipfile`` zips it (one member, deflate); that setup is timed apart and not counted. Then each
measurement runs in a fresh child process, so that its peak memory (VmHWM) is its own:

- ``convert_all_images`` (zip -> Parquet, streamed): seconds and peak memory;
- ``select_rows`` (the library's query path: DuckDB over the Parquet file, rows out as a
  DataFrame) for the commonest label's genus (``genus=...``) and a species' common name: the first
  call and the median of 3, and DuckDB's filter alone (a count of the same rows);
- MegaDetector's ``read_lila_all_images_file`` way: ``pandas.read_csv`` of the whole unzipped
  CSV into one DataFrame, then a boolean filter per query (median of 3). When the whole file
  would need more than ``--pandas-budget-gb`` of memory (estimated from ``--pandas-rows``
  rows), that slice's time and memory are scaled linearly to all rows, and labelled so.

    python benchmarks/bench_lila_table.py [--rows 10000000] [--pandas-rows 2000000] [--work-dir DIR]

Without ``--work-dir`` the files go to a temporary folder deleted at the end (10M rows: 5.4 GB of
CSV, 0.4 GB zip, 0.4 GB Parquet); with it they are kept there and reused by the next run of the
same ``--rows``. Figures and their reading: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from classification.data.lila.index import ALL_IMAGES_FILE, CLOUDS, RANKS, Dataset
from machine_load import describe_load

CSV_FILE = ALL_IMAGES_FILE.removesuffix(".zip")
PARQUET_FILE = "lila_image_urls_and_labels.parquet"
N_DATASETS, N_LOCATIONS, N_SPECIES, N_COARSE = 40, 5000, 600, 60
FRAMES_PER_SEQUENCE, SEQUENCES_PER_VISIT = 3, 20
EMPTY_SHARE, DATETIME_MISSING_SHARE = 0.30, 0.10
CLOUD_BASES = {"gcp": "https://storage.googleapis.com/public-datasets-lila",
               "aws": "http://us-west-2.opendata.source.coop/agentmorris/lila-wildlife",
               "azure": "https://lilawildlife.blob.core.windows.net/lila-wildlife"}
PLACES = ("Caltech", "Serengeti", "Karoo", "Kgalagadi", "Enonkishu", "Camdeboo", "Mountain Zebra", "Kruger", "Wellington",
          "Missouri", "Idaho", "Channel Islands", "Orinoquia", "Ohio", "Seattle", "Nebraska", "Desert Lion", "Otago",
          "Borneo", "Sumatra", "Gabon", "Namibia", "Patagonia", "Yukon", "Alberta", "Bavaria", "Scotland", "Iberia",
          "Mongolia", "Nepal", "Amazon", "Atlantic Forest", "Chaco", "Pantanal", "Tasmania", "Queensland", "Hawaii",
          "Madagascar", "Congo", "Sahel")
SYLLABLES = ("ba", "cer", "di", "fel", "ga", "lu", "mar", "ne", "or", "pan", "que", "ra", "sil", "ta", "ur", "vul",
             "xen", "zo", "cap", "lep", "mus", "sus", "can", "equ", "ovi", "bos", "pro", "cyo", "ict", "mel")
ADJECTIVES = ("red", "grey", "black", "white", "spotted", "striped", "lesser", "greater", "common", "pale", "dusky",
              "golden", "brown", "crested", "long-tailed", "short-eared", "pygmy", "giant", "northern", "southern",
              "eastern", "western", "mountain", "forest", "desert", "marsh", "island", "bush", "rock", "tufted")
NOUNS = ("fox", "deer", "rat", "mouse", "squirrel", "hare", "jackal", "mongoose", "genet", "civet", "duiker", "antelope",
         "pig", "porcupine", "badger", "marten", "weasel", "cat", "lynx", "owl", "francolin", "guineafowl", "pigeon",
         "thrush", "lizard", "monitor", "tortoise", "frog", "shrew", "opossum")
CLASSES = ("mammalia", "aves", "reptilia", "amphibia")


# ----------------------------------------------------------------------------------------------- the synthetic table

def _latin(rng: random.Random, used: set[str], syllables: int, suffix: str = "") -> str:
    """A new pseudo-Latin word (lower-case), unique within ``used``."""
    while True:
        word = "".join(rng.choice(SYLLABLES) for _ in range(syllables)) + suffix
        if word not in used:
            used.add(word)
            return word


def synthetic_taxa(seed: int = 0) -> list[dict[str, str]]:
    """Labels as LILA's taxonomy mapping has them: 600 species and 60 genus-level ones, most common first, then "empty"."""
    rng, used = random.Random(seed), set[str]()
    orders = [(CLASSES[k % len(CLASSES)], _latin(rng, used, 2, "iformes" if k % 4 == 1 else "ia")) for k in range(24)]
    families = [(*orders[k % len(orders)], _latin(rng, used, 2, "idae")) for k in range(100)]
    genera = [(*families[k % len(families)], _latin(rng, used, 2)) for k in range(N_SPECIES // 2)]
    names = [f"{adjective} {noun}" for noun in NOUNS for adjective in ADJECTIVES]
    rng.shuffle(names)
    taxa = []
    for k in range(N_SPECIES):
        klass, order, family, genus = genera[k // 2]
        species = f"{genus} {_latin(rng, used, 2, 'us')}"
        taxa.append({"scientific_name": species, "common_name": names[k], "class": klass, "order": order, "family": family,
                     "genus": genus, "species": species})
    for k in range(N_COARSE):
        klass, order, family, genus = genera[k * 5]
        taxa.append({"scientific_name": genus, "common_name": f"{genus} species", "class": klass, "order": order,
                     "family": family, "genus": genus})
    rng.shuffle(taxa)
    for taxon in taxa:
        taxon.update(kingdom="animalia", phylum="chordata", subphylum="vertebrata", query=taxon["common_name"],
                     original_label=taxon["common_name"].title())
    taxa.append({"scientific_name": "", "common_name": "empty", "query": "empty", "original_label": "empty"})
    return taxa


def synthetic_datasets() -> dict[str, Dataset]:
    """The datasets index of the synthetic table (only names matter to a taxon query)."""
    datasets = {}
    for place in PLACES[:N_DATASETS]:
        name, folder = f"{place} Camera Traps", place.lower().replace(" ", "-") + "-camera-traps"
        datasets[name] = Dataset(name=name, short_name=folder, continent="", country="", region=place, folder=folder,
                                 image_base_urls={cloud: f"{CLOUD_BASES[cloud]}/{folder}" for cloud in CLOUDS},
                                 metadata_urls={cloud: "" for cloud in CLOUDS}, md_results={})
    return datasets


def dataset_layout(rows: int, seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
    """Where each dataset sits in the table and what it holds, as LILA's file has it: datasets one after another
    (Zipf-like sizes), each with its own locations and its own ~15% of the labels (globally common ones in more
    datasets), plus blanks. Returns the datasets' rows and the (dataset, local rank, label) rows."""
    rng = random.Random(seed + 1)
    weights = [1 / (k + 1) ** 0.8 for k in range(N_DATASETS)]
    total, start, locations = sum(weights), 0, 0
    layout, labels = [], []
    levels = ("image", "sequence", "image", "unknown", "image")
    for k, dataset in enumerate(synthetic_datasets().values()):
        size = rows - start if k == N_DATASETS - 1 else round(rows * weights[k] / total)
        n_locations = max(5, round(N_LOCATIONS * weights[k] / total))
        held = [t for t in range(N_SPECIES + N_COARSE) if rng.random() < max(0.05, 0.6 / (1 + t / 20))]
        labels += [{"did": k, "k": j, "tid": t} for j, t in enumerate(held)]
        layout.append({"did": k, "name": dataset.name, "folder": dataset.folder, "level": levels[k % len(levels)],
                       "start": start, "n_labels": len(held), "loc_offset": locations, "n_locations": n_locations})
        start, locations = start + size, locations + n_locations
    return layout, labels


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """The synthetic all-images CSV, written by DuckDB from ``range(rows)`` (deterministic hashes, no Python loop)."""
    import duckdb  # noqa: PLC0415 - the child processes that do not write the CSV need not load it
    import pandas as pd  # noqa: PLC0415

    taxa = synthetic_taxa(seed)
    labels = pd.DataFrame({"tid": range(len(taxa)), **{column: [taxon.get(column) or None for taxon in taxa]
                                                       for column in ("original_label", "scientific_name", "common_name", *RANKS)}})
    layout, held = dataset_layout(rows, seed)
    connection = duckdb.connect()
    connection.register("labels", labels)
    connection.register("datasets", pd.DataFrame(layout))
    connection.register("held", pd.DataFrame(held))
    empty_tid = len(taxa) - 1
    uniform = "(hash({}, {}) % 1000000) / 1e6"
    path_sql = "d.folder || '/loc_' || lpad(CAST(r.loc AS VARCHAR), 4, '0') || '/' || r.file || '.jpg'"
    ranks_sql = ", ".join(f'l."{rank}"' for rank in RANKS)
    connection.execute(f"""
        COPY (
          WITH s AS (
            SELECT i, i // {FRAMES_PER_SEQUENCE} AS seq, CAST(i % {FRAMES_PER_SEQUENCE} AS INTEGER) AS frame, d.*
            FROM range({int(rows)}) t(i) ASOF JOIN datasets d ON t.i >= d.start
          ), r AS (
            SELECT *, substr(md5(CAST(i AS VARCHAR)), 1, 16) AS file,
                   CAST(hash(i // {FRAMES_PER_SEQUENCE * SEQUENCES_PER_VISIT}, 13) % n_locations AS INTEGER) AS loc,
                   {uniform.format("seq", 11)} < {EMPTY_SHARE} AS blank,
                   CAST(floor(n_labels * pow({uniform.format("seq", 12)}, 2.5)) AS INTEGER) AS k
            FROM s
          )
          SELECT r.name AS dataset_name,
                 {", ".join(f"'{CLOUD_BASES[cloud]}/' || {path_sql.replace('d.folder', 'r.folder')} AS url_{cloud}" for cloud in CLOUDS)},
                 r.name || ' : ' || CAST(r.i AS VARCHAR) AS image_id,
                 r.name || ' : seq_' || CAST(r.seq AS VARCHAR) AS sequence_id,
                 r.name || ' : loc_' || CAST(r.loc AS VARCHAR) AS location_id,
                 r.frame AS frame_num, l.original_label, l.scientific_name, l.common_name,
                 CASE WHEN {uniform.format("r.seq", 14)} < {DATETIME_MISSING_SHARE} THEN NULL
                      ELSE strftime(TIMESTAMP '2012-01-01 00:00:00' + to_seconds(CAST(hash(r.loc_offset + r.loc, 15) % 300000000 AS BIGINT)
                                    + r.seq * 37 + r.frame), '%m-%d-%Y %H:%M:%S') END AS datetime,
                 r.level AS annotation_level, {ranks_sql}
          FROM r LEFT JOIN held h ON h.did = r.did AND h.k = r.k
                 JOIN labels l ON l.tid = CASE WHEN r.blank THEN {empty_tid} ELSE h.tid END
          ORDER BY r.i
        ) TO '{path}' (HEADER)""")
    connection.close()


def zip_csv(csv_path: Path, zip_path: Path) -> None:
    """The CSV as LILA ships it: one member, deflated."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(csv_path, CSV_FILE)


def prepare_files(work_dir: Path, rows: int, seed: int) -> tuple[Path, Path, dict[str, float] | None]:
    """The CSV and its zip in ``work_dir``, and the seconds making them took (None: reused, a previous run made them)."""
    csv_path, zip_path, stamp = work_dir / CSV_FILE, work_dir / ALL_IMAGES_FILE, work_dir / "rows.txt"
    if csv_path.is_file() and zip_path.is_file() and stamp.is_file() and stamp.read_text() == f"{rows} {seed}":
        return csv_path, zip_path, None
    stamp.unlink(missing_ok=True)
    started = time.perf_counter()
    write_csv(csv_path, rows, seed)
    generated = time.perf_counter()
    zip_csv(csv_path, zip_path)
    stamp.write_text(f"{rows} {seed}")
    return csv_path, zip_path, {"generate": generated - started, "zip": time.perf_counter() - generated}


def common_queries(seed: int = 0) -> tuple[str, str]:
    """The queries timed: the commonest label's genus (``genus=...``, the most rows) and the 11th commonest species' common name."""
    taxa = synthetic_taxa(seed)
    species = [taxon for taxon in taxa[:-1] if taxon.get("species")]
    return f"genus={taxa[0]['genus']}", species[10]["common_name"]


# ----------------------------------------------------------------------------------------------- the measured children

def _peak_mb() -> float:
    """This process's peak resident memory in MB: Linux's VmHWM, else ``ru_maxrss``.

    VmHWM belongs to this process's own address space; ``ru_maxrss`` survives ``exec`` and so
    starts at the parent's peak in a child that ``subprocess`` started by vfork.
    """
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)


def child_convert(zip_path: str, parquet_path: str) -> dict[str, Any]:
    from classification.data.lila.table import convert_all_images  # noqa: PLC0415 - imported in the measured child only

    imported = _peak_mb()
    started = time.perf_counter()
    convert_all_images(zip_path, parquet_path, progress=False)
    return {"seconds": time.perf_counter() - started, "peak_mb": _peak_mb(), "imports_mb": imported}


def child_query(parquet_path: str, taxon: str, repeats: int, seed: int) -> dict[str, Any]:
    """``select_rows`` for one taxon (the library's whole path), and DuckDB's filter alone (a count of the same rows)."""
    from classification.data.lila.select import SelectionOptions, base_where, select_rows, taxon_sql  # noqa: PLC0415
    from classification.data.lila.table import connect, table_columns  # noqa: PLC0415
    from classification.data.lila.taxa import Taxonomy  # noqa: PLC0415

    datasets, taxonomy, path = synthetic_datasets(), Taxonomy(synthetic_taxa(seed)), Path(parquet_path)
    options = SelectionOptions(taxa=(taxon,))
    imported, times, counts, rows = _peak_mb(), [], [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        selection = select_rows(path, datasets, taxonomy, options)
        times.append(time.perf_counter() - started)
        rows = selection.matched_rows
    where, (condition, params) = base_where(options, datasets), taxon_sql(options, taxonomy, table_columns(path))
    connection = connect()
    for _ in range(repeats):
        started = time.perf_counter()
        connection.execute(f"SELECT count(*) FROM read_parquet(?) WHERE {where.sql()} AND ({condition})",
                           [str(path), *where.params, *params]).fetchall()
        counts.append(time.perf_counter() - started)
    return {"first": times[0], "median": statistics.median(times), "count": statistics.median(counts), "rows": rows,
            "peak_mb": _peak_mb(), "imports_mb": imported}


def child_pandas(csv_path: str, nrows: int, queries: list[str], repeats: int) -> dict[str, Any]:
    import pandas as pd  # noqa: PLC0415

    imported = _peak_mb()
    started = time.perf_counter()
    frame = pd.read_csv(csv_path, nrows=nrows)  # MegaDetector's read_lila_all_images_file: pd.read_csv(unzipped_csv_filename)
    load = time.perf_counter() - started
    result: dict[str, Any] = {"load": load, "peak_mb": _peak_mb(), "imports_mb": imported, "rows": len(frame), "queries": {}}
    for query in queries:
        rank, _, value = query.rpartition("=")
        column = rank or "common_name"
        times, matched = [], 0
        for _ in range(repeats):
            started = time.perf_counter()
            matched = len(frame[frame[column] == value])
            times.append(time.perf_counter() - started)
        result["queries"][query] = {"median": statistics.median(times), "rows": matched}
    result["peak_mb"] = _peak_mb()
    return result


def run_child(*args: Any) -> dict[str, Any]:
    """This script in a fresh interpreter doing one measured job; its JSON result (last line of its stdout)."""
    done = subprocess.run([sys.executable, __file__, "_child", *map(str, args)], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                                     os.environ.get("PYTHONPATH")]))})
    if done.returncode != 0:
        raise SystemExit(f"child {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(argv: list[str]) -> int:
    job, *args = argv
    if job == "convert":
        result = child_convert(*args)
    elif job == "query":
        result = child_query(args[0], args[1], int(args[2]), int(args[3]))
    elif job == "pandas":
        result = child_pandas(args[0], int(args[1]), json.loads(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown child job {job!r}")
    print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------- the benchmark

def measure_pandas(csv_path: Path, rows: int, slice_rows: int, budget_gb: float, queries: list[str], repeats: int) -> dict[str, Any]:
    """pandas on the whole CSV when it fits the budget (estimated from a slice first), else the slice scaled to ``rows``."""
    if slice_rows >= rows:
        return {**run_child("pandas", csv_path, rows, json.dumps(queries), repeats), "scaled_from": None}
    part = run_child("pandas", csv_path, slice_rows, json.dumps(queries), repeats)
    factor = rows / part["rows"]
    estimate_mb = part["imports_mb"] + (part["peak_mb"] - part["imports_mb"]) * factor
    if estimate_mb <= budget_gb * 1024:
        return {**run_child("pandas", csv_path, rows, json.dumps(queries), repeats), "scaled_from": None}
    return {"load": part["load"] * factor, "peak_mb": estimate_mb, "imports_mb": part["imports_mb"], "rows": rows,
            "queries": {query: {"median": q["median"] * factor, "rows": round(q["rows"] * factor)} for query, q in part["queries"].items()},
            "scaled_from": part["rows"]}


def print_table(rows: int, sizes: Mapping[str, float], setup: dict[str, float] | None, convert: dict[str, Any],
                queries: dict[str, dict[str, Any]], pandas: dict[str, Any]) -> None:
    import duckdb  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415
    import pyarrow as pa  # noqa: PLC0415

    gb = 1 << 30
    made = "reused from --work-dir" if setup is None else f"generate {setup['generate']:.0f} s, zip {setup['zip']:.0f} s"
    print(f"rows {rows:,}; CSV {sizes['csv'] / gb:.2f} GB; zip {sizes['zip'] / gb:.2f} GB; Parquet {sizes['parquet'] / gb:.2f} GB "
          f"(setup, not counted: {made}); pyarrow {pa.__version__}, duckdb {duckdb.__version__}, pandas {pd.__version__}")
    print(f"{'':36}{'Parquet + DuckDB (library)':>28}{'pandas (MegaDetector)':>26}")
    print(f"{'load: seconds':36}{convert['seconds']:>21.1f} (once){pandas['load']:>17.1f} (each run)")
    print(f"{'load: peak memory MB (of it imports)':36}{convert['peak_mb']:>20,.0f} ({convert['imports_mb']:>3.0f})"
          f"{pandas['peak_mb']:>18,.0f} ({pandas['imports_mb']:>3.0f})")
    for query, figures in queries.items():
        theirs = pandas["queries"][query]
        print(f"{'query ' + query + ': seconds':36}{figures['median']:>13.2f} (first {figures['first']:.2f}){theirs['median']:>26.2f}")
        print(f"{'  DuckDB filter alone (count)':36}{figures['count']:>28.2f}")
        print(f"{'  rows matched':36}{figures['rows']:>28,}{theirs['rows']:>26,}")
    print(f"{'query: peak memory MB (of it imports)':36}{max(q['peak_mb'] for q in queries.values()):>20,.0f} "
          f"({max(q['imports_mb'] for q in queries.values()):>3.0f}){'(the load)':>26}")
    scaled = f"scaled from {pandas['scaled_from']:,} rows" if pandas["scaled_from"] else "measured on all rows"
    print(f"pandas: {scaled}. Query seconds: median of the repeats; the library's = select_rows (DuckDB over the Parquet file, "
          "deduplicated, sorted, out as a DataFrame); pandas' = a boolean filter of the loaded DataFrame.")


def bench(work_dir: Path, args: argparse.Namespace) -> None:
    csv_path, zip_path, setup = prepare_files(work_dir, args.rows, args.seed)
    parquet_path = work_dir / PARQUET_FILE
    parquet_path.unlink(missing_ok=True)
    convert = run_child("convert", zip_path, parquet_path)
    taxa = list(common_queries(args.seed))
    queries = {taxon: run_child("query", parquet_path, taxon, args.repeats, args.seed) for taxon in taxa}
    pandas = measure_pandas(csv_path, args.rows, args.pandas_rows, args.pandas_budget_gb, taxa, args.repeats)
    sizes = {"csv": csv_path.stat().st_size, "zip": zip_path.stat().st_size, "parquet": parquet_path.stat().st_size}
    print_table(args.rows, sizes, setup, convert, queries, pandas)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the synthetic all-images table")
    parser.add_argument("--pandas-rows", type=int, default=2_000_000, help="rows pandas reads first, scaled to --rows if the whole won't fit")
    parser.add_argument("--pandas-budget-gb", type=float, default=12.0, help="largest pandas peak memory to try on all rows")
    parser.add_argument("--repeats", type=int, default=3, help="query repeats (median reported)")
    parser.add_argument("--work-dir", type=Path, help="keep the files here (reused by the next run); default: a temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(describe_load())
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        bench(args.work_dir, args)
        return 0
    work_dir = Path(tempfile.mkdtemp(prefix="bench_lila_table_"))
    try:
        bench(work_dir, args)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
