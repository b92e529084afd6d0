"""Taxonomy tables and species lists: roll unconfident species up, keep answers to the species a place can have.

**Taxonomy** (``postprocess.taxonomy``): a CSV with one row per model class,
``label,genus,family,order,class`` (optional ``species``, ``common_name``; an empty cell is
a rank the class has no name at, e.g. ``bird_spec`` without a genus). When no species is
confident, the answer rolls up to the first rank (genus, family, order, class) whose most
probable taxon has a summed probability of at least the threshold; otherwise "unknown".
Each lower taxon must sit under one higher taxon (a genus in two families is refused).

**Species list** (``postprocess.species_list``): a CSV ``location,label,status`` with status
``allow`` or ``block``; an empty location is the whole project; ``label`` is a model class or,
with a taxonomy, a taxon (``felidae`` stands for every class in it). At a location the allowed
classes are its own ``allow`` rows if it has any, else the project's if it has any, else every
class; minus the project's and its own ``block`` rows.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classification.errors import DataError
from classification.io import read_string_csv

RANKS = ("genus", "family", "order", "class")  # bottom-up; the model's label is the species rank
STATUSES = ("allow", "block")
DESCRIPTION_NAMESPACE = uuid.UUID("6f1d6f5e-2a58-4d3c-9a53-4b0f5a8e6c11")  # stable ids for MegaDetector's descriptions


@dataclass(frozen=True)
class Taxonomy:
    """Each model class's taxon at every rank ("" where it has none), in label-index order."""

    label_names: tuple[str, ...]
    ranks: dict[str, tuple[str, ...]]
    species: tuple[str, ...]
    common_names: tuple[str, ...]

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Class name -> class number."""
        return {name: i for i, name in enumerate(self.label_names)}

    def taxon(self, label: str, rank: str) -> str:
        """``label``'s taxon at ``rank`` ("" when none, or when ``label`` is not a model class)."""
        index = self.index.get(label)
        return "" if index is None else self.ranks[rank][index]

    def classes_of(self, name: str) -> list[int]:
        """Model classes that are ``name`` or sit under the taxon ``name``."""
        return [i for i, label in enumerate(self.label_names)
                if label == name or any(self.ranks[rank][i] == name for rank in RANKS)]


def read_taxonomy(path: Path, label_names: Sequence[str]) -> Taxonomy:
    """The taxonomy CSV, checked: every model class once, no unknown label, one parent per taxon."""
    frame = read_string_csv(Path(path), ("label", *RANKS))
    frame = frame.apply(lambda column: column.str.strip())
    duplicated = frame["label"][frame["label"].duplicated()].tolist()
    unknown = sorted(set(frame["label"]) - set(label_names))
    missing = [name for name in label_names if name not in set(frame["label"])]
    if duplicated or unknown or missing:
        problem = (f"label {duplicated[0]!r} given twice" if duplicated else f"{unknown[0]!r} is not a model class" if unknown
                   else f"no row for the model's classes {', '.join(missing[:5])}")
        raise DataError(f"{path}: {problem}")
    rows = frame.set_index("label").loc[list(label_names)]
    for lower, upper in zip(RANKS, RANKS[1:]):
        named = rows[rows[lower] != ""]
        parents = named.groupby(lower)[upper].nunique()
        if (parents > 1).any():
            raise DataError(f"{path}: {lower} {parents[parents > 1].index[0]!r} sits under more than one {upper}")
    optional = {key: tuple(rows[key]) if key in rows else ("",) * len(rows) for key in ("species", "common_name")}
    return Taxonomy(tuple(label_names), {rank: tuple(rows[rank]) for rank in RANKS}, optional["species"], optional["common_name"])


def taxon_probabilities(probabilities: np.ndarray, taxonomy: Taxonomy, rank: str) -> tuple[list[str], np.ndarray]:
    """The taxa at ``rank`` and each row's summed probability of each (classes without a taxon there left out)."""
    names = sorted({taxon for taxon in taxonomy.ranks[rank] if taxon})
    sums = np.zeros((len(probabilities), len(names)))
    for j, name in enumerate(names):
        members = [i for i, taxon in enumerate(taxonomy.ranks[rank]) if taxon == name]
        sums[:, j] = probabilities[:, members].sum(axis=1)
    return names, sums


def roll_up(probabilities: np.ndarray, taxonomy: Taxonomy, rows: np.ndarray, threshold: float,
            unknown_label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the ``rows`` (a boolean mask): the first taxon whose summed probability reaches ``threshold``.

    Returns (answer, rank, probability) arrays for those rows, in order; ``unknown_label`` (rank
    "none", probability of the top class) where no rank has such a taxon.
    """
    picked = probabilities[rows]
    answer = np.full(len(picked), unknown_label, dtype=object)
    rank_of = np.full(len(picked), "none", dtype=object)
    probability = picked.max(axis=1) if len(picked) else np.zeros(0)
    open_rows = np.ones(len(picked), dtype=bool)
    for rank in RANKS:
        names, sums = taxon_probabilities(picked, taxonomy, rank)
        if not names:
            continue
        best, best_sum = sums.argmax(axis=1), sums.max(axis=1)
        hit = open_rows & (best_sum >= threshold)
        answer[hit] = np.asarray(names, dtype=object)[best[hit]]
        rank_of[hit] = rank
        probability = np.where(hit, best_sum, probability)
        open_rows &= ~hit
    return answer, rank_of, probability


def rank_accuracy(predicted: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy) -> dict[str, dict[str, float]]:
    """Top-1 at every rank: the predicted class's taxon against the true class's (rows whose truth has one)."""
    result = {"species": {"top1": float((predicted == targets).mean()) if len(targets) else 0.0, "n": int(len(targets))}}
    for rank in RANKS:
        taxa = np.asarray(taxonomy.ranks[rank], dtype=object)
        scored = taxa[targets] != ""
        hits = taxa[predicted[scored]] == taxa[targets[scored]]
        result[rank] = {"top1": float(hits.mean()) if scored.any() else 0.0, "n": int(scored.sum())}
    return result


def answer_is_right(answer: str, rank: str, true_label: str, taxonomy: Taxonomy | None) -> bool:
    """Whether an answer (a class, or a taxon at ``rank``) contains the true class."""
    if rank == "species":
        return answer == true_label
    return taxonomy is not None and rank in RANKS and taxonomy.taxon(true_label, rank) == answer


def taxonomy_path(taxonomy: Taxonomy, name: str) -> tuple[list[str], str]:
    """``[class, order, family, genus]`` names and the species of a model class or a taxon (empty below a taxon's rank)."""
    top_down = list(reversed(RANKS))
    if name in taxonomy.label_names:
        i = taxonomy.label_names.index(name)
        return [taxonomy.ranks[rank][i] for rank in top_down], taxonomy.species[i]
    for rank in RANKS:
        if name in taxonomy.ranks[rank]:
            i = taxonomy.ranks[rank].index(name)
            depth = top_down.index(rank) + 1
            return [taxonomy.ranks[r][i] if k < depth else "" for k, r in enumerate(top_down)], ""
    return ["", "", "", ""], ""


def megadetector_descriptions(names: Sequence[str], taxonomy: Taxonomy) -> dict[str, str]:
    """MegaDetector's ``classification_category_descriptions`` for category ids ``0..``: ``id;class;order;family;genus;species;name``.

    The layout SpeciesNet writes and MegaDetector's smoothing tools parse. ``names`` are model
    classes, taxa of the table, or other answers (``unknown``: every rank empty); the first field
    is a stable UUID made from the rest, the last the common name when the table gives one.
    """
    descriptions = {}
    for i, name in enumerate(names):
        ranks, species = taxonomy_path(taxonomy, name)
        common = taxonomy.common_names[taxonomy.label_names.index(name)] if name in taxonomy.label_names else ""
        rest = ";".join([*ranks, species, common or name]).lower()
        descriptions[str(i)] = f"{uuid.uuid5(DESCRIPTION_NAMESPACE, rest)};{rest}"
    return descriptions


# ---------------------------------------------------------------- species lists


@dataclass(frozen=True)
class SpeciesList:
    """Allowed and blocked classes per location ("" = the whole project)."""

    allow: dict[str, frozenset[int]]
    block: dict[str, frozenset[int]]

    def allowed(self, location: str, num_classes: int) -> np.ndarray:
        """Boolean mask of the classes allowed at ``location`` (see the module docstring)."""
        chosen = self.allow.get(location) or self.allow.get("") or frozenset(range(num_classes))
        mask = np.zeros(num_classes, dtype=bool)
        mask[list(chosen)] = True
        mask[list(self.block.get("", frozenset()) | self.block.get(location, frozenset()))] = False
        return mask


def read_species_list(path: Path, label_names: Sequence[str], taxonomy: Taxonomy | None) -> SpeciesList:
    """The species-list CSV; a label that is neither a class nor a taxon, or a bad status, is one line."""
    frame = read_string_csv(Path(path), ("location", "label", "status"))
    sets: dict[str, dict[str, set[int]]] = {status: {} for status in STATUSES}
    given: dict[tuple[str, str], tuple[str, int]] = {}
    for number, row in enumerate(frame.itertuples(index=False), start=2):
        status, label = row.status.strip().lower(), row.label.strip()
        if status not in STATUSES:
            raise DataError(f"{path}: line {number}: status {row.status!r}: expected allow or block")
        earlier = given.setdefault((row.location.strip(), label), (status, number))
        if earlier[0] != status:  # which one was meant? block would win without a word
            raise DataError(f"{path}: line {number}: label {label!r} at location {row.location.strip()!r}: {status}, "
                            f"but line {earlier[1]} says {earlier[0]}")
        classes = taxonomy.classes_of(label) if taxonomy is not None else [i for i, n in enumerate(label_names) if n == label]
        if not classes:
            what = "a model class or a taxon of postprocess.taxonomy" if taxonomy is not None else "a model class"
            raise DataError(f"{path}: line {number}: label {label!r} is not {what}")
        sets[status].setdefault(row.location.strip(), set()).update(classes)
    return SpeciesList(*({k: frozenset(v) for k, v in sets[status].items()} for status in STATUSES))


def allowed_matrix(species_list: SpeciesList, locations: Sequence[str], num_classes: int) -> np.ndarray:
    """(N, C) mask of the classes allowed at each row's location."""
    masks = {location: species_list.allowed(location, num_classes) for location in set(locations)}
    return np.stack([masks[location] for location in locations]) if len(locations) else np.zeros((0, num_classes), bool)


def renormalise(probabilities: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Probabilities of the allowed classes, renormalised to sum to 1 (a row with none allowed is left as it was)."""
    kept = probabilities * allowed
    totals = kept.sum(axis=1, keepdims=True)
    return np.where(totals > 0, kept / np.where(totals > 0, totals, 1.0), probabilities)
