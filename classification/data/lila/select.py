"""Select rows of LILA's all-images table: by taxon, dataset, location, region and annotation level,
mapped to one taxonomic level, capped per dataset, location and class, with blanks if asked; seeded.

Labels merge across datasets: every row's class is its value at ``label_rank`` (species by default),
so "rat" in one dataset, "Rattus rattus" in another and "black rat" in a third are one class; rows
named only at a coarser level have no value there and are dropped and counted, never guessed.
Caps keep whole images (an image with two species counts once in each class) and draw them in an
order fixed by ``seed`` (an MD5 of the image id and the seed, the same on every machine and version).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from classification.data.lila.index import CLOUDS, Dataset
from classification.data.lila.table import connect, table_columns
from classification.data.lila.taxa import EMPTY_LABELS, Taxonomy, check_rank
from classification.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

EMPTY_CLASS = "empty"
ANNOTATION_LEVELS = ("image", "sequence", "unknown")
OUTPUT_COLUMNS = ("dataset_name", "image_id", "sequence_id", "location_id", "frame_num",
                  "original_label", "scientific_name", "common_name", "datetime", "annotation_level")


@dataclass(frozen=True)
class SelectionOptions:
    """What to select (empty tuples: no restriction) and how to label and cap it."""

    taxa: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()
    continents: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    annotation_levels: tuple[str, ...] = ()
    include_empty: int = 0
    max_per_dataset: int | None = None
    max_per_location: int | None = None
    max_per_class: int | None = None
    label_rank: str = "species"
    seed: int = 0


@dataclass
class Selection:
    """The selected rows (one per image and class, with ``label``) and what was left out, for the report."""

    rows: pd.DataFrame
    matched_rows: int = 0
    coarser_than_rank: int = 0
    capped_images: int = 0
    empty_images: int = 0
    classes: dict[str, int] = field(default_factory=dict)

    def summary(self, rank: str) -> list[str]:
        lines = [f"{self.rows['image_id'].nunique()} images, {len(self.classes)} classes "
                 f"({self.matched_rows} matching rows; {self.empty_images} blank images)"]
        if self.coarser_than_rank:
            lines.append(f"  {self.coarser_than_rank} rows named only above {rank} level: left out (--label-rank to keep them)")
        if self.capped_images:
            lines.append(f"  {self.capped_images} images over the caps: left out")
        lines += [f"  {label}: {count}" for label, count in sorted(self.classes.items(), key=lambda kv: (-kv[1], kv[0]))[:30]]
        return lines


def _parts(value: str) -> set[str]:
    """A datasets-index cell as its lower-cased parts (``"USA, Canada"`` holds two countries)."""
    return {part.strip().lower() for part in value.replace(";", ",").split(",") if part.strip()}


def _match_places(datasets: Mapping[str, Dataset], wanted: Sequence[str], attribute: str, flag: str) -> set[str]:
    """The dataset names whose ``attribute`` (country, continent, region) is one of ``wanted``."""
    known = {part for dataset in datasets.values() for part in _parts(getattr(dataset, attribute))}
    for value in wanted:
        if value.strip().lower() not in known:
            raise UserError(f"{flag} {value!r}: no LILA dataset lists it{did_you_mean(value.strip().lower(), known, n=3)}")
    lowered = {value.strip().lower() for value in wanted}
    return {name for name, dataset in datasets.items() if _parts(getattr(dataset, attribute)) & lowered}


def chosen_datasets(datasets: Mapping[str, Dataset], options: SelectionOptions) -> set[str] | None:
    """The dataset names the options allow (by name or short name, and place), or None for all."""
    allowed: set[str] | None = None
    if options.datasets:
        by_any = {key.lower(): dataset.name for dataset in datasets.values() for key in (dataset.name, dataset.short_name)}
        names = set()
        for value in options.datasets:
            if value.lower() not in by_any:
                raise UserError(f"--dataset {value!r}: not a LILA dataset{did_you_mean(value.lower(), by_any, n=3)}")
            names.add(by_any[value.lower()])
        allowed = names
    for attribute, flag in (("country", "--country"), ("continent", "--continent"), ("region", "--region")):
        wanted = getattr(options, {"country": "countries", "continent": "continents", "region": "regions"}[attribute])
        if wanted:
            matched = _match_places(datasets, wanted, attribute, flag)
            allowed = matched if allowed is None else allowed & matched
    if allowed is not None and not allowed:
        raise UserError("no LILA dataset matches all of --dataset, --country, --continent and --region together")
    return allowed


class _Where:
    """A SQL WHERE clause built from parts, with its parameters."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.params: list[Any] = []

    def add(self, sql: str, *params: Any) -> None:
        self.parts.append(sql)
        self.params.extend(params)

    def any_of(self, column: str, values: Sequence[Any]) -> None:
        self.add(f"{column} IN ({', '.join('?' for _ in values)})", *values)

    def sql(self) -> str:
        return " AND ".join(f"({part})" for part in self.parts) or "TRUE"


def _location_condition(where: _Where, locations: Sequence[str], datasets: Mapping[str, Dataset]) -> None:
    """``--location``: LILA's ``location_id`` (``"<dataset> : <location>"``) or the subset's ``<short_name>/<location>``."""
    by_short = {dataset.short_name.lower(): dataset.name for dataset in datasets.values()}
    ids = []
    for value in locations:
        short, slash, rest = value.partition("/")
        if slash and short.lower() in by_short:
            ids.append(f"{by_short[short.lower()]} : {rest}")
        ids.append(value)
    where.any_of("location_id", ids)


def base_where(options: SelectionOptions, datasets: Mapping[str, Dataset]) -> _Where:
    """The conditions every selected row meets, blank or not."""
    where = _Where()
    allowed = chosen_datasets(datasets, options)
    if allowed is not None:
        where.any_of("dataset_name", sorted(allowed))
    if options.locations:
        _location_condition(where, options.locations, datasets)
    if options.annotation_levels:
        for level in options.annotation_levels:
            if level not in ANNOTATION_LEVELS:
                raise UserError(f"--annotation-level {level!r}: not one of {', '.join(ANNOTATION_LEVELS)}{did_you_mean(level, ANNOTATION_LEVELS)}")
        where.any_of("annotation_level", list(options.annotation_levels))
    return where


def _empty_sql() -> tuple[str, list[str]]:
    marks = ", ".join("?" for _ in EMPTY_LABELS)
    return f"(lower(original_label) IN ({marks}) OR common_name IN ({marks}))", [*sorted(EMPTY_LABELS), *sorted(EMPTY_LABELS)]


def taxon_sql(options: SelectionOptions, taxonomy: Taxonomy, columns: Sequence[str]) -> tuple[str, list[str]]:
    """The OR of every ``--taxon``'s conditions (none given: every row that is not blank)."""
    if not options.taxa:
        empty, params = _empty_sql()
        return f"NOT {empty}", params
    parts, params = [], []
    for text in options.taxa:
        for column, value in taxonomy.resolve(text).conditions:
            if column not in columns:
                raise UserError(f"--taxon {text!r}: the all-images table has no {column} column")
            parts.append(f'"{column}" = ?')
            params.append(value)
    return " OR ".join(parts), params


def label_sql(rank: str, columns: Sequence[str]) -> str:
    if rank == "original":
        return "lower(trim(original_label))"
    if rank not in columns:
        raise UserError(f"--label-rank {rank!r}: the all-images table has no such column")
    return f'nullif(trim("{rank}"), \'\')'


def _capped(connection: Any, table: str, cap: int | None, partition: str) -> None:
    """Keep at most ``cap`` images per ``partition`` (whole images, in the seeded order)."""
    if cap is None:
        return
    connection.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM {table} "
                       f"QUALIFY dense_rank() OVER (PARTITION BY {partition} ORDER BY h, image_id) <= {int(cap)}")


def _check_caps(options: SelectionOptions) -> None:
    for name in ("max_per_dataset", "max_per_location", "max_per_class"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if options.include_empty < 0:
        raise UserError(f"--include-empty must be 0 or more, got {options.include_empty}")


def _selected(cloud: str) -> str:
    """The columns a selection returns: ``url`` is the chosen cloud's (the others follow from the datasets index)."""
    if cloud not in CLOUDS:
        raise UserError(f"--cloud {cloud!r}: not one of {', '.join(CLOUDS)}")
    return ", ".join([f'"url_{cloud}" AS url', *(f'"{column}"' for column in OUTPUT_COLUMNS)])


def select_rows(parquet_path: Path, datasets: Mapping[str, Dataset], taxonomy: Taxonomy, options: SelectionOptions,
                cloud: str = "gcp") -> Selection:
    """The rows ``options`` ask for, one per image and class (column ``label``; ``url`` the ``cloud``'s), capped and seeded.

    Only the chosen cloud's URL column is read: the URLs are the longest values, and the same path
    under each cloud's image base URL."""
    _check_caps(options)
    check_rank(options.label_rank)
    columns = table_columns(parquet_path)
    base = base_where(options, datasets)
    taxon, taxon_params = taxon_sql(options, taxonomy, columns)
    label = label_sql(options.label_rank, columns)
    capped = any(cap is not None for cap in (options.max_per_class, options.max_per_location, options.max_per_dataset))
    order = "md5(image_id || ':' || CAST(? AS VARCHAR))" if capped else "CAST(? AS VARCHAR)"  # the caps' seeded order
    selected = _selected(cloud)
    connection = connect()
    source = "read_parquet(?)"
    where, params = f"{base.sql()} AND ({taxon})", [str(parquet_path), *base.params, *taxon_params]
    matched_rows, coarser = connection.execute(  # reads only the filter's and the label's columns
        f"SELECT count(*), count(*) FILTER (WHERE {label} IS NULL) FROM {source} WHERE {where}", params).fetchone()
    connection.execute(
        f"CREATE TEMP TABLE picked AS SELECT DISTINCT {selected}, {label} AS label, {order} AS h FROM {source} "
        f"WHERE {where} AND {label} IS NOT NULL", [options.seed, *params])
    before = connection.execute("SELECT count(DISTINCT image_id) FROM picked").fetchone()[0]
    _capped(connection, "picked", options.max_per_class, "label")
    _capped(connection, "picked", options.max_per_location, "location_id")
    _capped(connection, "picked", options.max_per_dataset, "dataset_name")
    after = connection.execute("SELECT count(DISTINCT image_id) FROM picked").fetchall()[0][0]  # read whole: .sql() needs it
    classes = dict(connection.execute("SELECT label, count(DISTINCT image_id) FROM picked GROUP BY label").fetchall())
    # through Arrow: twice as fast as .df() on a million rows
    rows = connection.sql("SELECT * EXCLUDE (h) FROM picked ORDER BY dataset_name, image_id, label").to_arrow_table().to_pandas()
    empty = _empty_rows(connection, parquet_path, base, options, selected) if options.include_empty else rows.iloc[0:0]
    if len(empty):
        rows = pd.concat([rows, empty], ignore_index=True)
        classes[EMPTY_CLASS] = int(empty["image_id"].nunique())
    if rows.empty:
        raise UserError("the selection is empty: no LILA image matches all the options given")
    return Selection(rows=rows.fillna(""), matched_rows=int(matched_rows), coarser_than_rank=int(coarser),
                     capped_images=int(before - after), empty_images=int(empty["image_id"].nunique()) if len(empty) else 0,
                     classes={str(k): int(v) for k, v in classes.items()})


def _empty_rows(connection: Any, parquet_path: Path, base: _Where, options: SelectionOptions, selected: str) -> pd.DataFrame:
    """``include_empty`` blank images under the same dataset, place and level conditions, in the seeded order."""
    empty, params = _empty_sql()
    frame = connection.execute(
        f"SELECT {selected}, ? AS label FROM read_parquet(?) WHERE {base.sql()} AND {empty} "
        f"AND image_id NOT IN (SELECT image_id FROM picked) "
        f"QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY url) = 1 "
        f"ORDER BY md5(image_id || ':' || CAST(? AS VARCHAR)), image_id LIMIT {int(options.include_empty)}",
        [EMPTY_CLASS, str(parquet_path), *base.params, *params, options.seed]).df()
    if len(frame) < options.include_empty:
        log.warning("--include-empty %d: only %d blank images match the other options", options.include_empty, len(frame))
    return frame.sort_values(["dataset_name", "image_id"]).reset_index(drop=True)
