"""YAML as the project reads it: PyYAML's safe loader, refusing what it would silently accept.

A key given twice in one mapping (PyYAML keeps the last), aliases that expand a few lines
into billions of values (a "billion laughs" bomb), and integers beyond 64 bits are each one
line with their position; a config file is read through ``io.read_bounded_text``, so a FIFO or
``/dev/zero`` given as a config neither hangs nor fills memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from classification.errors import DataError
from classification.io import read_bounded_text

__all__ = ["MAX_YAML_VALUES", "UniqueKeyLoader", "load_yaml", "read_yaml_mapping"]

MAX_YAML_VALUES = 100_000  # a config has tens; aliases of aliases can make billions out of a few lines


def expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is expanded (a recursive alias counts once)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    sizes[key] = 1  # a node that refers back to itself is not expanded again
    children: list[Any] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    total = 1
    for child in children:
        total += expanded_size(child, sizes)
        if total > MAX_YAML_VALUES:
            break
    sizes[key] = total
    return total


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults" may be overridden by the keys beside it
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it below
            if seen is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {seen})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def construct_document(self, node: yaml.Node) -> Any:
        """Refuse a document whose aliases expand it beyond ``MAX_YAML_VALUES`` values (a "billion laughs" bomb)."""
        if expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"expands to more than {MAX_YAML_VALUES:,} values through aliases (&name / *name)",
                node.start_mark)
        return super().construct_document(node)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer; one beyond 64 bits (``batch_size: 1000...000``) is refused here, not deep in a library."""
        value = super().construct_yaml_int(node)
        if abs(value) >= 2**63:
            raise yaml.constructor.ConstructorError(None, None, f"integer too large ({len(node.value)} digits)",
                                                    node.start_mark)
        return value


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; malformed YAML is one line with its position."""
    text = read_bounded_text(path, "a config.yml file")  # not a FIFO or /dev/zero: they would hang or fill memory
    try:
        data = load_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise DataError(f"{path}: not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise DataError(f"{path}: not usable YAML: nested too deeply") from None
    if data is None:
        raise DataError(f"{path}: empty config (data_root at least is required)")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data
