"""Atomic writes (``classification.io``): temporary names and what they must never break."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from classification.errors import DataError
from classification.io import copy_file_atomic, link_atomic, remove_stale_temporaries, temporary_name, write_bytes_atomic

NAME_MAX = 255  # bytes in one path component on Linux and macOS filesystems


@pytest.mark.parametrize("name", ["a" * 230 + ".jpg", "é" * 115 + ".jpg", "x" * 251 + ".jpg"])
def test_a_long_file_name_is_written_atomically(tmp_path: Path, name: str) -> None:
    """A name that fits the filesystem is written, whatever the temporary's process and thread suffix adds
    (a crop named after a long image file name used to stop the crop run with 'File name too long')."""
    assert len(name.encode()) <= NAME_MAX
    target = tmp_path / name
    write_bytes_atomic(target, b"crop")
    assert target.read_bytes() == b"crop"
    assert link_atomic(target, tmp_path / ("b" + name[1:]))
    copy_file_atomic(target, tmp_path / ("c" + name[1:]))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([name, "b" + name[1:], "c" + name[1:]])


def test_temporary_names_fit_are_distinct_and_are_found_as_stale(tmp_path: Path) -> None:
    """Shortened temporaries stay within NAME_MAX, differ for two long names that share a prefix, and are
    still what ``remove_stale_temporaries`` clears after a killed run."""
    first, second = tmp_path / ("p" * 240 + "1.jpg"), tmp_path / ("p" * 240 + "2.jpg")
    names = [Path(temporary_name(path)).name for path in (first, second, tmp_path / "3.pt")]
    assert all(len(name.encode()) <= NAME_MAX for name in names)
    assert len(set(names)) == 3
    assert names[2] == f".3.pt.{os.getpid()}-{threading.get_ident()}.tmp"  # short names unchanged
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    assert sorted(path.name for path in remove_stale_temporaries(tmp_path)) == sorted(names)
    assert list(tmp_path.iterdir()) == []


def test_copying_under_a_file_is_one_line(tmp_path: Path) -> None:
    """A file where the copy's folder should be is the same one-line error as for every output folder."""
    source = tmp_path / "a.jpg"
    source.write_bytes(b"crop")
    (tmp_path / "taken").write_text("not a folder", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot be created: a file is in the way"):
        copy_file_atomic(source, tmp_path / "taken" / "sub" / "a.jpg")
