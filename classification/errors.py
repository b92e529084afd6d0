"""Errors that a user can act on: each one prints as one line and exits non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a field): printed as one line.

    The message names the file and the field, e.g.
    ``data/cct.json: annotations[17].bbox: width is negative``.
    """


class DataError(UserError):
    """Input data that cannot be used as it is (malformed JSON, bad boxes, ...)."""


def closest_names(word: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """Up to ``n`` of ``choices`` that look like ``word`` (a typo's likely targets), closest first."""
    return difflib.get_close_matches(str(word), sorted(set(choices)), n=n, cutoff=0.6)


def did_you_mean(word: str, choices: Iterable[str], n: int = 1, quote: bool = False) -> str:
    """`` (did you mean X?)`` naming the closest of ``choices`` (``repr``-quoted with ``quote``), or ``""``:
    the one hint every "unknown name" error ends with."""
    close = closest_names(word, choices, n)
    return f" (did you mean {', '.join(repr(c) if quote else c for c in close)}?)" if close else ""
