"""LILA's all-images table as Parquet: converted once, in bounded memory, then queried column by column.

The zipped CSV (millions of rows, several GB unzipped) is streamed out of the zip through
pyarrow's CSV reader, block by block, into a Parquet file (zstd): it is never unzipped to disk
nor held in memory whole, so the conversion's peak memory stays near a few blocks whatever the
table's size. Names are lower-cased once here (``scientific_name``, ``common_name``, every rank),
so that queries compare plain values, and every half million rows are sorted by taxon into small
row groups, so that a taxon query skips most of the file. Queries run in DuckDB, which reads only the columns and row
groups a query needs (``benchmarks/bench_lila_table.py`` measures both against pandas).

The Parquet file is written atomically and records the zip's size and modification time: an
interrupted conversion leaves nothing under its name, and a refreshed zip is converted again.
"""

from __future__ import annotations

import csv
import logging
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from classification.data.lila.index import ALL_IMAGES_COLUMNS, RANKS, all_images_member
from classification.errors import DataError
from classification.io import atomic_open, repeated_name, shown_json

log = logging.getLogger(__name__)

PARQUET_FILE = "lila_image_urls_and_labels.parquet"
FORMAT_VERSION = "2"  # a new layout converts existing tables again
LOWERED_COLUMNS = ("scientific_name", "common_name", *RANKS)
BLOCK_BYTES = 4 << 20  # CSV read per block: the conversion's peak memory follows it (16 MB: 1.1 GB, 64 MB: 3 GB)
SORT_ROWS = 1 << 19  # rows sorted together by taxon before writing
ROW_GROUP_ROWS = 1 << 16  # small row groups of one taxon each let DuckDB skip the rest of the file
SORT_COLUMNS = ("class", "order", "family", "genus", "species", "scientific_name", "common_name")
SOURCE_KEY = b"classification.lila.source"


class _CountingReader:
    """A binary stream that advances a progress bar by the bytes read through it."""
    def __init__(self, raw: IO[bytes], bar: Any) -> None:
        self.raw = raw
        self.bar = bar
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bar.update(len(data))
        return data

    def readable(self) -> bool:
        return True


def _source_stamp(zip_path: Path) -> bytes:
    stat = zip_path.stat()
    return f"{FORMAT_VERSION}:{stat.st_size}:{stat.st_mtime_ns}".encode()


def is_converted(zip_path: Path, parquet_path: Path) -> bool:
    """True when ``parquet_path`` is a complete conversion of this very zip (same size and time, same format)."""
    if not parquet_path.is_file():
        return False
    try:
        metadata = pq.read_schema(parquet_path).metadata or {}
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError: not a Parquet file
        return False
    return metadata.get(SOURCE_KEY) == _source_stamp(zip_path)


def _check_header(names: Sequence[str], where: str) -> list[str]:
    """The header's rank columns; a missing required column is one line naming it."""
    missing = [column for column in ALL_IMAGES_COLUMNS if column not in names]
    if (twice := repeated_name(names)) is not None:
        raise DataError(f"{where}: the column {shown_json(twice)} is named twice in the header (only one could be read)")
    if missing:
        raise DataError(f"{where}: column {missing[0]!r} missing (has LILA changed the format? columns: {', '.join(names[:14])})")
    return [rank for rank in RANKS if rank in names]


@contextmanager
def _csv_batches(zip_path: Path, progress: bool) -> Iterator[Any]:
    """pyarrow's streaming CSV reader over the zip's one member, every column as text."""
    member = all_images_member(zip_path)
    where = f"{zip_path}: {member}"
    with zipfile.ZipFile(zip_path) as archive, archive.open(member) as raw:
        header = raw.readline().decode("utf-8-sig").rstrip("\r\n")
        names = next(csv.reader([header]), [])
        _check_header(names, where)
        size = archive.getinfo(member).file_size
        with tqdm(total=size, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
            stream = _CountingReader(raw, bar)
            try:
                reader = pacsv.open_csv(
                    stream,  # pyarrow takes any object with read()
                    read_options=pacsv.ReadOptions(column_names=names, block_size=BLOCK_BYTES),
                    convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in names}),
                )
                yield reader, names
            except pa.ArrowInvalid as error:
                raise DataError(f"{where}: not a readable CSV ({str(error).splitlines()[0]})") from None
            except zipfile.BadZipFile as error:  # a CRC error: the zip is damaged
                raise DataError(f"{where}: damaged zip ({error}); fetch it again with --refresh-index") from None


def _lowered(batch: Any) -> Any:
    """The batch with its name columns lower-cased and stripped."""
    arrays = [pc.utf8_trim_whitespace(pc.utf8_lower(column)) if name in LOWERED_COLUMNS else column
              for name, column in zip(batch.schema.names, batch.columns)]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def _write_sorted(writer: Any, batches: list[Any]) -> None:
    """Buffered batches as row groups sorted by taxon, so that one taxon's rows share few row groups."""
    if batches:
        table = pa.Table.from_batches(batches)
        keys = [(name, "ascending") for name in SORT_COLUMNS if name in table.schema.names]
        writer.write_table(table.sort_by(keys), row_group_size=ROW_GROUP_ROWS)


def convert_all_images(zip_path: str | Path, parquet_path: str | Path, progress: bool = False) -> Path:
    """Convert the zipped all-images CSV to Parquet (atomically), unless this zip was converted already."""
    zip_path, parquet_path = Path(zip_path), Path(parquet_path)
    if is_converted(zip_path, parquet_path):
        return parquet_path
    log.info("converting %s to %s (once)", zip_path, parquet_path)
    rows = 0
    with _csv_batches(zip_path, progress) as (reader, _), atomic_open(parquet_path, "wb") as handle:
        schema = reader.schema.with_metadata({SOURCE_KEY: _source_stamp(zip_path)})
        with pq.ParquetWriter(handle, schema, compression="zstd") as writer:
            buffer: list[Any] = []
            try:
                for batch in reader:
                    buffer.append(_lowered(batch))
                    rows += batch.num_rows
                    if sum(b.num_rows for b in buffer) >= SORT_ROWS:
                        _write_sorted(writer, buffer)
                        buffer = []
                _write_sorted(writer, buffer)
            except pa.ArrowInvalid as error:
                raise DataError(f"{zip_path}: row near {rows + 2}: not a readable CSV row ({str(error).splitlines()[0]})") from None
    if rows == 0:
        parquet_path.unlink()
        raise DataError(f"{zip_path}: the all-images table has no rows")
    log.info("%d rows converted", rows)
    return parquet_path


def table_columns(parquet_path: Path) -> list[str]:
    """The converted table's columns."""
    return list(pq.read_schema(parquet_path).names)


def connect() -> Any:
    """A DuckDB connection (in memory) for queries over the Parquet table."""
    return duckdb.connect(database=":memory:")
