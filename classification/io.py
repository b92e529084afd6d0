"""Atomic file writes and careful JSON and CSV reading: the general file helpers every stage uses.

Every file the pipeline writes goes to a temporary file in the same folder and is
then moved into place with ``os.replace``: a crash never leaves a half-written file
that a later run would trust. This module is the bottom layer (with ``errors``): it imports no
other part of the library, and pandas only inside the CSV helpers, so importing it stays cheap.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import stat
import threading
import warnings
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from classification.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


NAME_MAX = 255  # bytes in one file name on the usual filesystems (ext4, XFS, APFS)


def temporary_name(path: Path) -> str:
    """``.<name>.<process>-<thread>.tmp`` beside ``path``: unique to its writer (no two writers of one
    path share a process and thread), so it needs no random name and no exclusive create, which cost
    ~0.07 ms a file (a tenth of writing a crop); permissions follow the umask, as for a plain file.

    The suffix adds up to ~30 bytes (mkstemp's added 14): where that would pass ``NAME_MAX``, the name
    is cut and a digest of the whole name added (``.<start>~<digest>.<process>-<thread>.tmp``), so a file
    whose own name fits is still written (a crop named after a long image file name)."""
    suffix = f".{os.getpid()}-{threading.get_ident()}.tmp"
    name = path.name
    encoded = os.fsencode(name)
    if len(encoded) + len(suffix) + 1 > NAME_MAX:
        digest = hashlib.sha256(encoded).hexdigest()[:16]
        start = encoded[: NAME_MAX - len(suffix) - len(digest) - 2]
        name = f"{start.decode('utf-8', 'ignore')}~{digest}"  # a character cut in two is dropped
    return str(path.with_name(f".{name}{suffix}"))


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8",
                durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and move it onto ``path``.

    ``durable=False`` skips the fsync: a killed process still never leaves a partial file
    under ``path`` (the rename comes after the last write), but a power cut may; the caller
    then syncs a whole batch at once (``sync_files``) before anything trusts those files.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a file to write")
    ensure_folder(path.parent)
    tmp_name = temporary_name(path)
    access = os.O_RDWR if "+" in mode else os.O_WRONLY
    try:
        fd = os.open(tmp_name, access | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise DataError(f"{path}: cannot be written ({error.strerror})") from None
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def ensure_folder(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) for output; a file in the way, or a folder that cannot be created
    (no permission, a read-only filesystem), is a one-line ``DataError`` naming it, not a traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"{folder}: exists and is not a folder (an output folder is needed here)") from None
    except NotADirectoryError:
        raise DataError(f"{folder}: cannot be created: a file is in the way of one of its parent folders") from None
    except OSError as error:
        raise DataError(f"{folder}: cannot create the folder ({error.strerror})") from None
    return folder


def check_output_file(path: str | Path) -> None:
    """Refuse, before any work, an output file that cannot be written where it is: a folder, or under a file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a file to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{path}: cannot be written: {parent} is a file, not a folder")
            break


def remove_stale_temporaries(folder: str | Path, name_glob: str = "*", recursive: bool = False) -> list[Path]:
    """Delete the temporary files (``.<name>.<process>-<thread>.tmp``, see ``temporary_name``) that ``atomic_open`` leaves behind when its
    process is killed mid-write; they never become real files. Call it when a run that owns ``folder`` starts."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name_glob}.*.tmp"
    removed = sorted(path for path in (folder.rglob(pattern) if recursive else folder.glob(pattern)) if path.is_file())
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def sync_files(paths: Iterable[str | Path]) -> None:
    """Make files written with ``atomic_open(durable=False)`` durable: one ``os.sync`` where the
    system has it (one flush instead of one fsync per file), else an fsync of each file."""
    if hasattr(os, "sync"):
        os.sync()
        return
    for path in paths:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())


def link_atomic(source: str | Path, target: str | Path) -> bool:
    """Make ``target`` a hard link of ``source``, atomically (a link beside it, moved into place with
    ``os.replace``): the same file under a second name, no second write (timm's ``_duplicate``).
    False where the filesystem has no hard links (FAT, some network or FUSE mounts): copy instead."""
    target = Path(target)
    tmp = Path(temporary_name(target))
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def copy_file_atomic(source: str | Path, target: str | Path) -> None:
    """Copy ``source`` to ``target`` with its metadata (``shutil.copy2``) atomically: into a temporary
    file beside ``target``, fsynced, then moved into place, so a crash never leaves a partial copy."""
    target = Path(target)
    ensure_folder(target.parent)
    tmp = Path(temporary_name(target))
    try:
        shutil.copy2(source, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def unreadable_file(path: Path, error: OSError | UnicodeDecodeError, expected: str, hint: str = "") -> DataError:
    """The one-line error for a file that cannot be read as text: missing (``hint`` added), a folder,
    under a file (a file given where a folder was expected: ``<file>/datapackage.json``), not
    permitted, another I/O error, or not UTF-8."""
    if isinstance(error, UnicodeDecodeError):
        return DataError(f"{path}: not a UTF-8 text file (invalid byte at offset {error.start})")
    if isinstance(error, FileNotFoundError):
        return DataError(f"{path}: file not found{hint}")
    if isinstance(error, IsADirectoryError):
        return DataError(f"{path}: is a folder, expected {expected}")
    if isinstance(error, NotADirectoryError):
        return DataError(f"{path}: not found ({path.parent} is a file, not a folder)")
    if isinstance(error, PermissionError):
        return DataError(f"{path}: cannot be read (permission denied)")
    return DataError(f"{path}: cannot be read ({error.strerror or error})")


CONFIG_READ_LIMIT = 1 << 20  # a config.yml or .env file: 1 MiB is ~100 times the largest real one
FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, as a message names it: ``a folder``, ``a FIFO (named pipe)``, ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str | Path, what: str, hint: str = "") -> os.stat_result:
    """Refuse, in one line, what is not a regular file (a FIFO or ``/dev/zero`` would hang or fill memory when
    read); ``os.stat`` never blocks, where ``open`` on a FIFO waits for a writer. Returns the file's stat."""
    path = Path(path)
    try:
        status = os.stat(path)
    except OSError as error:
        raise unreadable_file(path, error, what, hint) from None
    if not stat.S_ISREG(status.st_mode):
        raise DataError(f"{path}: is {file_kind(status.st_mode)}, expected {what}")
    return status


def read_bounded_text(path: str | Path, what: str, limit: int = CONFIG_READ_LIMIT, encoding: str = "utf-8") -> str:
    """A small text file (a config, a ``.env``), refused in one line when it is not a regular file or over
    ``limit`` bytes (a file that grows while read is cut at ``limit`` and refused too)."""
    path = Path(path)
    check_regular_file(path, what)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise DataError(f"{path}: larger than {limit // 1024} KiB, expected {what}")
        return data.decode(encoding)
    except (OSError, UnicodeDecodeError) as error:
        raise unreadable_file(path, error, what) from None


class DuplicateKeyError(ValueError):
    """A JSON object that names a key twice (``json`` would keep only the last)."""


def unique_keys_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json``'s ``object_pairs_hook`` that refuses a key given twice in one object."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise DuplicateKeyError(key)
        found[key] = value
    return found


def read_json(path: str | Path, unique_keys: bool = False) -> Any:
    """Read a JSON file (UTF-8, with or without a byte-order mark); a missing, malformed or hostile file
    (a number of thousands of digits, nesting thousands deep) raises a one-line ``DataError``.

    ``unique_keys``: a key given twice in one object is refused too (for the small state files an
    earlier run wrote, where the earlier value would otherwise be lost without a word; it makes
    reading about twice as slow, so large inputs such as MegaDetector output do not ask for it)."""
    path = Path(path)
    check_regular_file(path, "a JSON file")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return json.load(handle, object_pairs_hook=unique_keys_object if unique_keys else None)
    except (OSError, UnicodeDecodeError) as error:
        raise unreadable_file(path, error, "a JSON file") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except DuplicateKeyError as error:
        raise DataError(f"{path}: the key {shown_json(str(error))} is given twice in one object (only the last would count)") from None
    except ValueError as error:  # Python refuses integers of more than 4300 digits
        raise DataError(f"{path}: not usable JSON: a number with too many digits ({str(error).split(':')[0]})") from None
    except RecursionError:
        raise DataError(f"{path}: not usable JSON: nested too deeply") from None


JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false", type(None): "null"}


def read_json_object(path: str | Path, optional: bool = False) -> dict[str, Any]:
    """A JSON file that must hold an object (a state file an earlier run wrote: a fit, a round's ``done.json``).

    With ``optional``, nothing at ``path`` reads as ``{}``; whatever is there is read, so a folder, a file cut
    short or one holding a list is a one-line ``DataError``, never taken for a file not written yet."""
    path = Path(path)
    if optional and not path.exists():
        return {}
    data = read_json(path, unique_keys=True)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, found {JSON_KINDS.get(type(data), type(data).__name__)}")
    return data


def shown_json(value: object, limit: int = 80) -> str:
    """``value`` as JSON for a one-line message (``null``, ``[1]``, ``"ab"``), cut to about ``limit`` characters."""
    return shown_value(json.dumps(value, ensure_ascii=False), limit)


def shown_value(text: str, limit: int = 80) -> str:
    """``text`` as a message may quote it: cut to ``limit`` characters (a 50 MB label is not echoed whole), with
    its size said when cut, so one value never floods a log line."""
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 3, 0)]}... ({len(text)} characters)"


def json_count(data: dict[str, Any], key: str, path: Path) -> int:
    """``data[key]`` as a count (an integer >= 0) of a JSON object read from ``path``, else a one-line ``DataError``."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{path}: {key}: expected a count (a whole number >= 0), got {value!r}")
    return value


def read_string_csv(path: Path, required: Collection[str], hint: str = "") -> pd.DataFrame:
    """A CSV with every column as a string (locations like ``001`` survive), checked for columns: a name given
    twice, a row with more fields than the header (a trailing comma) and a last row cut short are refused."""
    import pandas as pd  # noqa: PLC0415 - only the CSV helpers need pandas; the rest of io stays cheap to import

    check_regular_file(path, "a CSV file", hint)  # a FIFO would block pandas, /dev/zero fill memory
    check_csv_head(Path(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # pandas drops extra fields with only a warning
            # index_col=False: rows one field longer than the header must not make the first column the index
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except OSError as error:
        raise unreadable_file(Path(path), error, "a CSV file", hint) from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: {csv_parser_problem(str(error))}") from None
    missing = sorted(set(required) - set(frame.columns))
    if missing:
        raise DataError(f"{path}: missing columns {', '.join(missing)}")
    fields = last_row_fields(Path(path))
    if len(frame) and fields is not None and fields < len(frame.columns):
        raise DataError(f"{path}: row {len(frame) + 1}: {fields} of {len(frame.columns)} fields: the file looks cut short "
                        "(pandas would fill the rest with empty values)")
    return frame


def repeated_name(names: Iterable[str]) -> str | None:
    """The first non-empty column name a CSV header gives twice, else None (a reader would keep only one of them)."""
    seen: set[str] = set()
    for name in names:
        if name and name in seen:
            return name
        seen.add(name)
    return None


CSV_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def csv_parser_problem(message: str) -> str:
    """pandas' parser error as a short reason: a row too long names its line and both counts."""
    found = CSV_FIELD_COUNT.search(message)
    if found:
        expected, line, seen = found.groups()
        return f"line {line} has {seen} fields, the header {expected} (a comma too many, or a value with a comma not in quotes)"
    return f"not a readable CSV ({shown_value(message.splitlines()[0] if message else '', 200)})"


def check_csv_head(path: Path) -> None:
    """Refuse a header that names a column twice (pandas would read the second as ``name.1`` and every reader
    ignore it) and a first row longer than the header (pandas would take the first column for an index)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            first = next((row for row in reader if row), None)
            line = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error):
        return  # pandas reads the file next and says what is wrong with it
    twice = repeated_name(header)
    if twice is not None:
        raise DataError(f"{path}: the column {shown_json(twice)} is named twice in the header (only one could be read)")
    if first is not None and len(first) > len(header):
        trailing = " (a trailing comma?)" if first[len(header):] == [""] * (len(first) - len(header)) else ""
        raise DataError(f"{path}: line {line} has {len(first)} fields, the header {len(header)}{trailing}")


def last_row_fields(path: Path) -> int | None:
    """The number of fields of a CSV's last line when it lacks its final newline (how a file cut short ends), else None.

    pandas fills a short row with empty strings, so a truncated manifest or table would read as valid but for its rows lost."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            tail = handle.read()
    except OSError:
        return None
    if not tail or tail.endswith((b"\n", b"\r")):
        return None
    last = tail.rsplit(b"\n", 1)[-1]
    if b'"' in last:  # a quoted field may span lines: counting commas would guess
        return None
    return last.count(b",") + 1


def write_csv_atomic(path: Path, frame: pd.DataFrame) -> None:
    """Write a CSV atomically."""
    with atomic_open(path) as handle:
        frame.to_csv(handle, index=False)
