"""Labels read back from a label tool, in one shape whatever the tool.

Images are named by their relative POSIX path under the image root
(``cam03/2021/IMG_0042.JPG``), never by the basename alone: two cameras often write the
same file names. Every requested path ends up in exactly one place:

- ``labels``: it received a usable label (by majority vote when several people labelled it);
- ``unknown``: the (majority) label is not in the label index; kept, never dropped silently;
- ``conflicts`` only: the people disagreed with no majority (a tie), so it is not labelled;
- ``skipped``: skipped, cancelled, without a choice, or absent from the export.

``conflicts`` also lists the paths where a majority was applied, with every vote count.
Rows whose image matches no requested path go to ``unmatched``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from classification.errors import UserError
from classification.io import shown_value

# One vote: (label as written, annotator; "" when the tool does not say).
Vote = tuple[str, str]


@dataclass(frozen=True)
class ReceivedLabel:
    """One image's label as a person chose it."""

    path: str  # relative POSIX path under the image root
    label: str  # class name, spelled as in the label index
    annotator: str  # who labelled it ("" when the tool does not say; "a,b" when several agreed)
    source: str  # "label_studio:<project id>", "label_studio_export:<file>", "timelapse:<file>"


@dataclass
class LabelImport:
    """Everything a label tool gave back for the requested images (see the module docstring)."""

    labels: list[ReceivedLabel] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    conflicts: dict[str, dict[str, int]] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # label as written -> index name (case/spaces)
    skip_reasons: dict[str, str] = field(default_factory=dict)  # skipped path -> why ("no choice", "not a label: a number")

    def label_by_path(self) -> dict[str, str]:
        """``{path: label}`` for the images that received a usable label."""
        return {received.path: received.label for received in self.labels}

    def ties(self) -> list[str]:
        """Paths left unlabelled because the votes were tied."""
        labelled = {received.path for received in self.labels} | set(self.unknown)
        return [path for path in self.conflicts if path not in labelled]

    def summary(self) -> str:
        """One line with the counts, e.g. for the loop's log."""
        text = (
            f"{len(self.labels)} labelled, {len(self.skipped)} skipped, "
            f"{len(self.conflicts)} with disagreement ({len(self.ties())} tied, not labelled), "
            f"{len(self.unknown)} with a label not in the label index, {len(self.unmatched)} unmatched rows"
        )
        if self.renamed:
            fixes = ", ".join(f"{shown_value(repr(raw))} -> {shown_value(repr(name))}" for raw, name in sorted(self.renamed.items()))
            text += f"; labels matched ignoring case/spaces: {shown_value(fixes, 400)}"
        return text

    def skip_lines(self) -> list[str]:
        """One line per reason images were skipped (a number given as the label is not a skip in the tool), with
        how many and one example, so an export that labels nothing says why."""
        by_reason: dict[str, list[str]] = {}
        for path in self.skipped:
            by_reason.setdefault(self.skip_reasons.get(path, "skipped"), []).append(path)
        return [f"skipped ({reason}): {len(paths)} images, e.g. {shown_value(paths[0])}" for reason, paths in by_reason.items()]

    def detail_lines(self) -> list[str]:
        """The lines a person reads after the summary: unknown labels, disagreements, why images were skipped;
        every value quoted is cut short (a 50 MB label is not echoed whole)."""
        lines = [f"not in the label index (not stored): {shown_value(path)}: {shown_value(repr(label))}"
                 for path, label in sorted(self.unknown.items())]
        lines += [f"annotators disagree: {shown_value(path)}: {shown_value(repr(votes), 300)}"
                  for path, votes in sorted(self.conflicts.items())]
        return lines + self.skip_lines()


@dataclass
class VoteOutcome:
    """The result of ``resolve_votes``: winners, and the vote counts where people disagreed."""

    winners: dict[str, tuple[str, str]]  # path -> (label, annotators who chose it, comma-joined)
    conflicts: dict[str, dict[str, int]]  # path -> {label: votes}; ties have no winner


def resolve_votes(votes: Mapping[str, Sequence[Vote]]) -> VoteOutcome:
    """Majority vote per path over ``(label, annotator)`` votes; a tie for first place has no winner."""
    winners: dict[str, tuple[str, str]] = {}
    conflicts: dict[str, dict[str, int]] = {}
    for path, path_votes in votes.items():
        if not path_votes:
            continue
        counts = Counter(label for label, _ in path_votes)
        ranked = counts.most_common()
        if len(ranked) > 1:
            conflicts[path] = dict(sorted(counts.items()))
            if ranked[0][1] == ranked[1][1]:
                continue
        label = ranked[0][0]
        annotators = sorted({annotator for voted, annotator in path_votes if voted == label and annotator})
        winners[path] = (label, ",".join(annotators))
    return VoteOutcome(winners, conflicts)


def label_name_list(label_names: Iterable[str] | Mapping[str, str]) -> list[str]:
    """Class names from a list or a ``label_index.json`` mapping (``{"0": "agouti", ...}``)."""
    if isinstance(label_names, Mapping):
        try:
            items = sorted(label_names.items(), key=lambda item: int(item[0]))
        except ValueError:
            raise UserError('label index: keys must be integers such as "0", "1"') from None
        names = [str(name) for _, name in items]
    else:
        names = [str(name) for name in label_names]
    if not names:
        raise UserError("label index: no class names")
    if any(not name.strip() for name in names):
        raise UserError("label index: a class name is empty")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise UserError(f"label index: class names listed twice: {', '.join(duplicates)}")
    return names


class LabelMatcher:
    """Matches labels as written to the label index: exactly, else ignoring case and spaces."""

    def __init__(self, label_names: Iterable[str] | Mapping[str, str]) -> None:
        self.names = label_name_list(label_names)
        self._exact = set(self.names)
        folded = Counter(name.strip().casefold() for name in self.names)
        self._folded = {name.strip().casefold(): name for name in self.names if folded[name.strip().casefold()] == 1}
        self.renamed: dict[str, str] = {}

    def match(self, raw: str) -> tuple[str, bool]:
        """``(index name, True)`` for a known label, else ``(stripped label, False)``."""
        if raw in self._exact:
            return raw, True
        name = self._folded.get(raw.strip().casefold())
        if name is None:
            return raw.strip(), False
        self.renamed[raw] = name
        return name, True


def normalize_path(path: str) -> str:
    """A relative POSIX path: ``\\`` becomes ``/``; empty and ``.`` parts and leading ``/`` go."""
    parts = path.replace("\\", "/").split("/")
    return "/".join(part for part in parts if part not in ("", "."))


class PathMatcher:
    """Finds the requested path a tool's path names: exactly, else ignoring case when unique."""

    def __init__(self, requested_paths: Iterable[str] | None) -> None:
        self.requested: list[str] | None = None
        if requested_paths is not None:
            self.requested = list(dict.fromkeys(normalize_path(path) for path in requested_paths))
        paths = self.requested or []
        folded = Counter(path.casefold() for path in paths)
        self._exact = set(paths)
        self._folded = {path.casefold(): path for path in paths if folded[path.casefold()] == 1}

    def match(self, path: str) -> str | None:
        """The requested path for ``path``, or None; without a request list every path matches."""
        path = normalize_path(path)
        if self.requested is None:
            return path or None
        if path in self._exact:
            return path
        return self._folded.get(path.casefold())


def build_label_import(
    votes: Mapping[str, Sequence[Vote]],
    no_choice: Mapping[str, str] | Iterable[str],
    unmatched: Sequence[str],
    source: str,
    labels: LabelMatcher,
    paths: PathMatcher,
) -> LabelImport:
    """Resolve the votes gathered by a reader (paths already matched) into a ``LabelImport``; ``no_choice`` names the
    paths read without a usable label, with why when a mapping."""
    reasons = dict(no_choice) if isinstance(no_choice, Mapping) else dict.fromkeys(no_choice, "no choice")
    matched_votes: dict[str, list[Vote]] = {}
    for path, path_votes in votes.items():
        matched_votes[path] = [(labels.match(label)[0], annotator) for label, annotator in path_votes]
    outcome = resolve_votes(matched_votes)
    result = LabelImport(conflicts=outcome.conflicts, unmatched=list(unmatched), renamed=dict(labels.renamed))
    known = set(labels.names)
    order = paths.requested if paths.requested is not None else sorted(set(votes) | set(reasons))
    for path in order:
        if path in outcome.winners:
            label, annotator = outcome.winners[path]
            if label in known:
                result.labels.append(ReceivedLabel(path, label, annotator, source))
            else:
                result.unknown[path] = label
        elif path not in outcome.conflicts:
            result.skipped.append(path)
            result.skip_reasons[path] = reasons.get(path, "not in the export")
    return result
