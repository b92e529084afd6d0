"""The layering of docs/architecture.md that a plain `pytest` can check (CI also runs lint-imports)."""

from __future__ import annotations

import json
import subprocess
import sys

from classification.active_learning import strategies
from classification.config import STRATEGY_NAMES


def test_loading_a_config_imports_no_stage() -> None:
    code = ("import json, sys, classification.config; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('classification.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(loaded) == ["classification.config", "classification.errors", "classification.io",
                                 "classification.redaction"]


def test_strategies_implement_exactly_the_names_the_config_accepts() -> None:
    assert strategies.STRATEGIES == STRATEGY_NAMES
    assert set(strategies.OPTIONS) == set(STRATEGY_NAMES)
