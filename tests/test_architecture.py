"""The layering of docs/architecture.md that a plain `pytest` can check (CI also runs lint-imports)."""

from __future__ import annotations

import json
import subprocess
import sys

from classification.active_learning.registry import get_strategy, strategy_names
from classification.config import ActiveLearningConfig


def test_loading_a_config_imports_no_stage() -> None:
    code = ("import json, sys, classification.config; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('classification.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(loaded) == ["classification.config", "classification.errors", "classification.io",
                                 "classification.yaml_io"]


def test_the_registry_names_the_strategies_and_the_config_defaults_are_among_them() -> None:
    assert strategy_names()[:7] == ("random", "least_confidence", "margin", "entropy", "k_center", "coral", "informative_diverse")
    defaults = ActiveLearningConfig()
    for name in (defaults.strategy, *defaults.simulation.strategies):
        assert get_strategy(name).name == name
