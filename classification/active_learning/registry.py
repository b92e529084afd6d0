"""The active-learning strategies by name: one entry each, the one list the loop, the simulation and the CLI read.

An entry (``Strategy``) holds the name, the selection function, the options it takes, the inputs it
needs, whether it measures from the labelled set and which options it reads from the config. A new
strategy is one function with the signature ``(inputs, budget, seed, **options) -> Selection`` that
keeps the rules of ``strategies.py`` (never a labelled or excluded item, never one twice, at most
``budget``), plus one ``register_strategy`` call, here for the library's own or in a user's module
imported before the loop or the simulation runs.

The config stores a strategy as a plain string because it imports no stage; ``check_strategy_name``
validates a config field against this registry with the config's own one-line wording.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from classification.active_learning.strategies import (
    Selection,
    SelectionInputs,
    available_items,
    select_coral,
    select_informative_diverse,
    select_k_center,
    select_random,
    select_top_scores,
)
from classification.config import ActiveLearningConfig
from classification.errors import DataError, UserError, did_you_mean

__all__ = [
    "Strategy", "check_strategy_name", "get_strategy", "register_strategy", "select", "strategy_names",
]

SelectFunction = Callable[..., Selection]  # (inputs, budget, seed, **options) -> Selection
ConfigOptions = Callable[[ActiveLearningConfig], dict[str, Any]]  # the options a strategy takes from the config
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")  # a YAML value and a file name (the simulation's <strategy>.csv)


def no_config_options(settings: ActiveLearningConfig) -> dict[str, Any]:
    """A strategy that reads nothing from the config."""
    return {}


@dataclass(frozen=True)
class Strategy:
    """One registered strategy: how to call it and what it needs."""

    name: str
    function: SelectFunction
    options: tuple[str, ...] = ()  # keyword options the function accepts; any other is refused
    needs_probabilities: bool = False  # SelectionInputs.probabilities must be given
    needs_embeddings: bool = False  # SelectionInputs.embeddings must be given
    uses_labelled: bool = False  # measures from the labelled set: the loop embeds the train split as labelled items
    config_options: ConfigOptions = field(default=no_config_options)


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, function: SelectFunction, *, options: tuple[str, ...] = (),
                      needs_probabilities: bool = False, needs_embeddings: bool = False, uses_labelled: bool = False,
                      config_options: ConfigOptions = no_config_options) -> Strategy:
    """Add a strategy under ``name`` (lower-case letters, digits and ``_``); a name taken already is refused."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UserError(f"strategy name {name!r}: expected lower-case letters, digits and _, starting with a letter")
    if name in _STRATEGIES:
        raise UserError(f"strategy {name!r} is registered already")
    if not callable(function):
        raise UserError(f"strategy {name!r}: expected a selection function, got {function!r}")
    entry = Strategy(name, function, tuple(options), needs_probabilities, needs_embeddings, uses_labelled, config_options)
    _STRATEGIES[name] = entry
    return entry


def strategy_names() -> tuple[str, ...]:
    """Every registered strategy, in the order registered (the library's own first)."""
    return tuple(_STRATEGIES)


def _unknown(kind: str, name: object, known: tuple[str, ...]) -> UserError:
    """A one-line error naming the known choices and the closest one."""
    return UserError(f"unknown {kind} {name!r} (known: {', '.join(known) or 'none'}){did_you_mean(str(name), known, quote=True)}")


def get_strategy(name: str) -> Strategy:
    """The entry of a registered strategy; otherwise a one-line ``UserError`` with a suggestion."""
    if name not in _STRATEGIES:
        raise _unknown("active-learning strategy", name, strategy_names())
    return _STRATEGIES[name]


def check_strategy_name(name: str, key: str) -> str:
    """``name`` if registered; otherwise a one-line error on config key ``key`` worded as the config's own checks."""
    names = strategy_names()
    if name not in names:
        raise UserError(f"{key}: expected one of {', '.join(names)}, got {name!r}{did_you_mean(str(name), names)}")
    return name


def check_config_strategies(settings: ActiveLearningConfig, where: str = "") -> None:
    """The config's ``strategy`` and ``simulation.strategies`` are registered (``where``: the config file); a
    ``DataError`` like the config loader's otherwise."""
    prefix = f"{where}: " if where else ""
    try:
        check_strategy_name(settings.strategy, "active_learning.strategy")
        for i, name in enumerate(settings.simulation.strategies):
            check_strategy_name(name, f"active_learning.simulation.strategies[{i}]")
    except UserError as error:
        raise DataError(f"{prefix}{error}") from None


def check_options(entry: Strategy, options: Mapping[str, Any]) -> None:
    """Reject options the strategy does not take (typos fail instead of being ignored)."""
    for name in options:
        if name not in entry.options:
            raise _unknown(f"option for strategy {entry.name!r}:", name, entry.options)


def check_picks(entry: Strategy, inputs: SelectionInputs, budget: int, selection: object) -> Selection:
    """A selection keeps the rules every strategy promises: available items only, each once, at most ``budget``."""
    if not isinstance(selection, Selection):
        raise UserError(f"strategy {entry.name!r} returned {type(selection).__name__}, not a Selection")
    picked = selection.indices
    if len(picked) > budget or len(set(picked.tolist())) != len(picked):
        raise UserError(f"strategy {entry.name!r} picked {len(picked)} items ({len(set(picked.tolist()))} distinct) "
                        f"for a budget of {budget}")
    unavailable = np.setdiff1d(picked, available_items(inputs))
    if unavailable.size:
        raise UserError(f"strategy {entry.name!r} picked pool index {unavailable[0]}, which is labelled or excluded")
    return selection


def select(strategy: str, inputs: SelectionInputs, budget: int, seed: int, **options: Any) -> Selection:
    """Choose up to ``budget`` pool items to label next with the named (registered) strategy."""
    entry = get_strategy(strategy)
    check_options(entry, options)
    if entry.needs_probabilities and inputs.probabilities is None:
        raise UserError(f"strategy {strategy!r} needs predicted probabilities (SelectionInputs.probabilities)")
    if entry.needs_embeddings and inputs.embeddings is None:
        raise UserError(f"strategy {strategy!r} needs embeddings (SelectionInputs.embeddings)")
    return check_picks(entry, inputs, budget, entry.function(inputs, budget, seed, **options))


# ---------------------------------------------------------------- the library's strategies


def top_scores_strategy(score: str) -> SelectFunction:
    """The strategy of one uncertainty score: its top ``budget`` items (deterministic, so the seed is unused)."""

    def top_scores(inputs: SelectionInputs, budget: int, seed: int) -> Selection:
        return select_top_scores(inputs, budget, score=score)

    return top_scores


def coral_config_options(settings: ActiveLearningConfig) -> dict[str, Any]:
    """coral's diversity weight from the config."""
    return {"diversity_weight": settings.diversity_weight}


def informative_diverse_config_options(settings: ActiveLearningConfig) -> dict[str, Any]:
    """informative_diverse's number of clusters, when the config sets one."""
    return {} if settings.n_clusters is None else {"n_clusters": settings.n_clusters}


register_strategy("random", select_random)
register_strategy("least_confidence", top_scores_strategy("least_confidence"), needs_probabilities=True)
register_strategy("margin", top_scores_strategy("margin"), needs_probabilities=True)
register_strategy("entropy", top_scores_strategy("entropy"), needs_probabilities=True)
register_strategy("k_center", select_k_center, options=("chunk_size",), needs_embeddings=True, uses_labelled=True)
register_strategy("coral", select_coral, options=("score", "diversity_weight", "chunk_size"), needs_probabilities=True,
                  needs_embeddings=True, uses_labelled=True, config_options=coral_config_options)
register_strategy("informative_diverse", select_informative_diverse, options=("n_clusters", "max_iterations"),
                  needs_probabilities=True, needs_embeddings=True, config_options=informative_diverse_config_options)
