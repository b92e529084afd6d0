"""A strategy registered from outside the library is accepted by the config check and drives a simulated round."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from classification.active_learning import registry, simulation
from classification.active_learning.registry import register_strategy, select, strategy_names
from classification.active_learning.rounds import open_experiment
from classification.active_learning.simulation import SimulationData, head_curve
from classification.active_learning.strategies import Pick, Selection, SelectionInputs, available_items
from classification.config import SimulationConfig
from classification.data.samples import Sample
from classification.errors import UserError

NAME = "farthest_index"


def select_farthest_index(inputs: SelectionInputs, budget: int, seed: int, stride: int = 1) -> Selection:
    """The available items with the highest pool indices, every ``stride``-th, highest first (no built-in picks so)."""
    available = available_items(inputs)[::-1][::stride][:budget]
    return Selection(NAME, tuple(Pick(int(i), None, None, None, f"pool index {i}") for i in available))


@pytest.fixture
def farthest_index(monkeypatch: pytest.MonkeyPatch) -> Iterator[registry.Strategy]:
    """The strategy registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_STRATEGIES", dict(registry._STRATEGIES))
    yield register_strategy(NAME, select_farthest_index, options=("stride",), needs_embeddings=True,
                            config_options=lambda settings: {"stride": 2})


def write_config(folder: Path, strategy: str) -> Path:
    """A config whose loop and simulation use ``strategy`` (its data is never read here)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yml").write_text(f"data_root: data\nactive_learning:\n  strategy: {strategy}\n"
                                       f"  simulation:\n    strategies: [random, {strategy}]\n    rounds: 1\n    head_epochs: 2\n")
    return folder / "config.yml"


def test_an_unregistered_name_is_one_line_naming_the_field(tmp_path: Path) -> None:
    config = write_config(tmp_path, "farthest_indx")
    with pytest.raises(UserError, match=r"active_learning\.strategy: expected one of random, .* got 'farthest_indx'") as error:
        open_experiment(config)
    assert "\n" not in str(error.value) and str(config) in str(error.value)
    with pytest.raises(UserError, match=r"active_learning\.strategy: .* got 'margn' \(did you mean margin\?\)"):
        open_experiment(write_config(tmp_path / "typo", "margn"))


def test_register_refuses_a_taken_or_unusable_name(farthest_index: registry.Strategy) -> None:
    with pytest.raises(UserError, match="registered already"):
        register_strategy(NAME, select_farthest_index)
    with pytest.raises(UserError, match="lower-case letters"):
        register_strategy("../escape", select_farthest_index)


def test_select_calls_the_registered_strategy_and_checks_what_it_returns(farthest_index: registry.Strategy) -> None:
    labelled = np.zeros(10, dtype=bool)
    labelled[[9, 7]] = True
    inputs = SelectionInputs(labelled=labelled, embeddings=np.zeros((10, 2)))
    assert select(NAME, inputs, 3, seed=0, stride=1).indices.tolist() == [8, 6, 5]
    with pytest.raises(UserError, match="needs embeddings"):
        select(NAME, SelectionInputs(labelled=labelled), 3, seed=0)
    with pytest.raises(UserError, match="did you mean 'stride'"):
        select(NAME, inputs, 3, seed=0, strides=2)
    register_strategy("picks_labelled", lambda inputs, budget, seed: Selection("picks_labelled", (Pick(9, None, None, None, ""),)))
    with pytest.raises(UserError, match="picked pool index 9, which is labelled or excluded"):
        select("picks_labelled", inputs, 3, seed=0)


def test_a_simulated_round_labels_exactly_what_the_strategy_returned(farthest_index: registry.Strategy, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = open_experiment(write_config(tmp_path, NAME))  # the config check accepts the registered name
    assert NAME in strategy_names() and experiment.active_learning.simulation.strategies == ["random", NAME]
    n, budget, rng = 24, 5, np.random.default_rng(0)
    labels = np.arange(n) % 3
    samples = [Sample(tmp_path / f"{i}.jpg", int(labels[i]), "site", "test") for i in range(n)]
    data = SimulationData(samples, samples[:6], samples[:6], 3)
    train_x = np.column_stack([np.arange(n), rng.normal(size=n)]).astype(np.float32)  # column 0: the pool index
    start = np.zeros(n, dtype=bool)
    start[[0, 1, 2, 3, 4, 5]] = True
    trained_on: list[list[int]] = []
    original = simulation.train_mlp

    def recording_train_mlp(x: np.ndarray, y: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        trained_on.append(sorted(int(i) for i in x[:, 0]))
        return original(x, y, *args, **kwargs)

    monkeypatch.setattr(simulation, "train_mlp", recording_train_mlp)
    settings = SimulationConfig(strategies=[NAME], seeds=[0], rounds=1, head_epochs=2)
    rows = head_curve(experiment, data, NAME, 0, start, (train_x, train_x[:6]), settings, budget)
    expected = select_farthest_index(SelectionInputs(labelled=start), budget, 0, stride=2).indices.tolist()
    assert expected == [23, 21, 19, 17, 15]  # the config's option (stride 2) reached the strategy
    assert trained_on == [list(range(6)), sorted([*range(6), *expected])]
    assert [row[3] for row in rows] == [6, 6 + budget] and all(row[0] == NAME for row in rows)
