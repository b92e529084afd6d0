"""Taxon names as users type them (``"Rattus rattus"``, ``rattus``, ``"black rat"``, ``family=muridae``),
resolved against LILA's taxonomy mapping into column conditions on the all-images table.

A bare name matches every column it appears in (common name, scientific name, any rank), so
``rattus`` finds the genus and ``"black rat"`` the common name; ``rank=name`` matches that rank
only. A name the taxonomy does not hold is one line with the nearest names, never an empty download.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from classification.data.lila.index import RANKS, TAXONOMY_COLUMNS, open_csv_rows
from classification.errors import UserError, did_you_mean

NAME_COLUMNS = ("common_name", "scientific_name", *RANKS)
EMPTY_LABELS = frozenset({"empty", "blank", "none", "nothing", "no animal"})


@dataclass(frozen=True)
class TaxonQuery:
    """One ``--taxon``: the text given and the (column, value) pairs any of which selects a row."""

    text: str
    conditions: tuple[tuple[str, str], ...]


def normalise_name(name: str) -> str:
    """Names compare lower-cased, with runs of spaces and underscores as one space."""
    return " ".join(name.replace("_", " ").lower().split())




class Taxonomy:
    """The taxonomy mapping's names, by column: what a ``--taxon`` can match."""

    def __init__(self, rows: Sequence[dict[str, str]]) -> None:
        self.values: dict[str, set[str]] = defaultdict(set)
        self.queries: dict[str, set[str]] = defaultdict(set)  # a dataset's own label -> the scientific names it maps to
        for row in rows:
            query, scientific = normalise_name(row.get("query", "")), normalise_name(row.get("scientific_name", ""))
            if query and scientific:
                self.queries[query].add(scientific)
            for column in NAME_COLUMNS:
                value = normalise_name(row.get(column, ""))
                if value:
                    self.values[column].add(value)

    @classmethod
    def read(cls, path: Path) -> Taxonomy:
        return cls(open_csv_rows(path, TAXONOMY_COLUMNS))

    def all_names(self) -> set[str]:
        return set().union(*self.values.values(), self.queries)

    def resolve(self, text: str) -> TaxonQuery:
        """The conditions for one ``--taxon`` (``name`` or ``rank=name``); unknown ones are one-line UserErrors."""
        rank, _, name = text.rpartition("=")
        value = normalise_name(name)
        if not value:
            raise UserError(f"--taxon {text!r}: empty name")
        if rank:
            column = normalise_name(rank).replace(" ", "_")
            if column not in NAME_COLUMNS:
                raise UserError(f"--taxon {text!r}: unknown rank {rank!r}{did_you_mean(column, NAME_COLUMNS, n=3)}")
            if value not in self.values[column]:
                raise UserError(f"--taxon {text!r}: no {column} {name!r} in LILA's taxonomy{did_you_mean(value, self.values[column], n=3)}")
            return TaxonQuery(text, ((column, value),))
        columns = self._matches(value)
        if not columns:
            raise UserError(f"--taxon {text!r}: not a common name, scientific name or rank in LILA's taxonomy"
                            f"{did_you_mean(value, self.all_names(), n=3)}")
        return TaxonQuery(text, columns)

    def _matches(self, value: str) -> tuple[tuple[str, str], ...]:
        """Every column holding ``value``; a dataset's own label ("rat") stands for the taxa it maps to."""
        columns = [(column, value) for column in NAME_COLUMNS if value in self.values[column]]
        if not columns:
            for scientific in sorted(self.queries.get(value, ())):
                columns += [(column, scientific) for column in NAME_COLUMNS if scientific in self.values[column]]
        return tuple(dict.fromkeys(columns))


def check_rank(rank: str, where: str = "--label-rank") -> str:
    """A rank name (``species``, ``genus``, ...) or ``original``; else a one-line UserError with the nearest."""
    if rank == "original" or rank in RANKS:
        return rank
    raise UserError(f"{where} {rank!r}: not a rank{did_you_mean(rank, [*RANKS, 'original'], n=3)}")
