"""The split report: sizes and class fractions per split against their targets, the score, and warnings.

``split_report.json`` and its terminal table (``format_split_report``), for any assignment: a
search's, a user's ``--splits-file`` or a split held out in time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from classification.data.split_search import score_assignments
from classification.data.splits import SPLIT_NAMES, SplitProblem, check_fractions
from classification.io import shown_value

__all__ = ["FRACTION_TOLERANCE", "build_split_report", "format_split_report"]

FRACTION_TOLERANCE = 0.05  # a split whose crop fraction is further than this from its target is reported


def _fraction(part: float, whole: float) -> float:
    """``part / whole``, 0 for an empty whole."""
    return float(part) / float(whole) if whole else 0.0


def _split_sizes(in_split: list[np.ndarray], split_crops: np.ndarray, target: np.ndarray) -> tuple[dict, list[str]]:
    """The report's ``splits`` rows (locations, crops, fraction against target) and their warnings."""
    total = split_crops.sum()
    rows, warnings = {}, []
    for s, name in enumerate(SPLIT_NAMES):
        fraction = _fraction(split_crops[s].sum(), total)
        rows[name] = {
            "n_locations": int(in_split[s].sum()),
            "n_crops": int(split_crops[s].sum()),
            "fraction": round(fraction, 4),
            "target": round(float(target[s]), 4),
        }
        if target[s] > 0 and not in_split[s].any():
            warnings.append(f"{name} is empty (target {target[s]:.2f})")
        elif abs(fraction - target[s]) > FRACTION_TOLERANCE:
            warnings.append(f"{name} holds {fraction:.1%} of the crops, target {target[s]:.0%}")
    return rows, warnings


def _class_rows(problem: SplitProblem, split_crops: np.ndarray, split_locations: np.ndarray,
                target: np.ndarray) -> tuple[dict, list[str]]:
    """The report's ``classes`` rows (crops and locations per split) and a warning per class absent from a split."""
    label_totals = problem.counts.sum(axis=0)
    label_locations = (problem.counts > 0).sum(axis=0)
    rows, warnings = {}, []
    for y, label in enumerate(problem.labels):
        rows[label] = {
            "n_crops": int(label_totals[y]),
            "n_locations": int(label_locations[y]),
            **{
                name: {
                    "n_crops": int(split_crops[s, y]),
                    "n_locations": int(split_locations[s, y]),
                    "fraction": round(_fraction(split_crops[s, y], label_totals[y]), 4),
                }
                for s, name in enumerate(SPLIT_NAMES)
            },
        }
        absent = [name for s, name in enumerate(SPLIT_NAMES) if target[s] > 0 and split_crops[s, y] == 0]
        if absent:
            warnings.append(f"class {shown_value(repr(label))} is absent from {' and '.join(absent)}")
    return rows, warnings


def build_split_report(
    problem: SplitProblem,
    assignment: np.ndarray,
    fractions: Sequence[float] | np.ndarray,
    dropped_labels: dict[str, int] | None = None,
) -> dict:
    """A JSON-able ``split_report.json``: sizes and class fractions per split against targets, score, warnings.

    ``dropped_labels`` maps each label removed by ``--min-locs`` to the number of locations it was seen at.
    """
    target = check_fractions(fractions)
    assignment = np.asarray(assignment)
    in_split = [assignment == s for s in range(3)]
    split_crops = np.stack([problem.counts[mask].sum(axis=0) for mask in in_split])
    split_locations = np.stack([(problem.counts[mask] > 0).sum(axis=0) for mask in in_split])
    splits, split_warnings = _split_sizes(in_split, split_crops, target)
    classes, class_warnings = _class_rows(problem, split_crops, split_locations, target)
    dropped = dict(sorted((dropped_labels or {}).items()))
    dropped_warnings = [f"class {shown_value(repr(label))} dropped: seen at {n} location(s), below --min-locs" for label, n in dropped.items()]
    score = float(score_assignments(problem, assignment[None, :], target)[0])
    return {
        "score": round(score, 6),
        "targets": {name: round(float(target[s]), 4) for s, name in enumerate(SPLIT_NAMES)},
        "splits": splits,
        "classes": classes,
        "dropped_labels": dropped,
        "warnings": split_warnings + class_warnings + dropped_warnings,
    }


def format_split_report(report: dict) -> str:
    """The report as an aligned text table for the terminal: splits, then classes, then warnings."""
    names = list(SPLIT_NAMES)
    lines = [f"{'split':<8}{'locations':>10}{'crops':>10}{'fraction':>10}{'target':>8}"]
    for name in names:
        row = report["splits"][name]
        lines.append(f"{name:<8}{row['n_locations']:>10}{row['n_crops']:>10}{row['fraction']:>10.3f}{row['target']:>8.2f}")
    width = max([5, *(len(label) for label in report["classes"])])
    header = f"{'class':<{width}}{'crops':>8}{'locs':>6}" + "".join(f"{name:>15}" for name in names)
    lines += ["", header]
    for label, row in report["classes"].items():
        cells = "".join(f"{row[name]['n_crops']:>8} {row[name]['fraction']:>5.2f} " for name in names)
        lines.append(f"{label:<{width}}{row['n_crops']:>8}{row['n_locations']:>6}{cells}".rstrip())
    targets = " / ".join(f"{report['targets'][name]:.2f}" for name in names)
    lines += ["", f"score {report['score']:.4f} (lower is better; targets train/val/test {targets})"]
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines)
