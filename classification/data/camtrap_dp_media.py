"""Where a Camtrap DP package's media and tables are: URLs, paths inside the package, and the files behind them.

A package is a folder someone else made. A ``filePath`` is either a URL (http, https or s3,
the schemes ``classification.data.download.check_url`` fetches) or a relative path inside the
package; the file behind a path must, after every symbolic link is followed, still be a regular
file inside the folder it is read from. Otherwise a link (``PKG/leak -> /home/me/.ssh``) would
let the import read, and the export hard-link or copy, any file of this machine, and a FIFO
would hang the reader. Each refusal is one line naming the table's row.
"""

from __future__ import annotations

import os
import re
import stat
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any

from classification.errors import DataError
from classification.io import file_kind

URL_SCHEMES = ("http", "https", "s3")  # those of classification.data.download (not imported: it pulls in boto3)
URL_PREFIXES = tuple(f"{scheme}://" for scheme in URL_SCHEMES)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def is_url(file_path: str) -> bool:
    """True for a remote file (``https://host/...``, ``s3://bucket/...``); false for a path inside the package."""
    return file_path[:8].lower().startswith(URL_PREFIXES) and bool(urllib.parse.urlsplit(file_path).netloc)


def path_problem(file_path: str) -> str | None:
    """Why ``file_path`` is no relative path inside a package (None when it is one)."""
    if not file_path.strip():
        return "empty"
    if CONTROL_CHARACTERS.search(file_path):
        return "holds a control character (a NUL byte, a line break, ...)"
    if "://" in file_path:
        return f"a URL of a scheme not fetched here (only {', '.join(URL_SCHEMES)})"
    posix = file_path.replace("\\", "/")
    if posix.startswith("/") or ".." in posix.split("/") or (len(file_path) > 1 and file_path[1] == ":"):
        return "absolute or climbing out of the package (..)"
    return None


def check_media_paths(media: Any, path: Path) -> None:
    """Refuse a ``filePath`` that is neither an http(s)/s3 URL nor a relative path inside the package (the standard
    forbids it, and the files are read, linked and copied by that path), and a remote medium's file name that is
    no plain name (it names the downloaded file)."""
    for i, row in enumerate(media_rows(media)):
        file_path = str(row["filePath"])
        problem = None if is_url(file_path) else path_problem(file_path)
        if problem:
            raise DataError(f"{path}: row {i + 2}: filePath: expected a URL or a relative path inside the package, "
                            f"got {shown(file_path)}: {problem}")
        if is_url(file_path):
            name = media_file_name(row)
            problem = path_problem(name)
            if problem:
                raise DataError(f"{path}: row {i + 2}: fileName/deploymentID: the remote medium's file name {shown(name)} {problem}")


def media_rows(media: Any) -> list[dict[str, str]]:
    """The columns of media.csv that name a medium's file, row by row (a dict per row of four columns: ~10x faster
    than all of ``to_dict("records")`` on a million media)."""
    columns = [c for c in ("mediaID", "deploymentID", "filePath", "fileName") if c in media]
    return [dict(zip(columns, values)) for values in zip(*(media[c].tolist() for c in columns))]


def shown(value: str, limit: int = 120) -> str:
    """``value`` quoted for a one-line message, cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def media_file_name(row: Any) -> str:
    """The CCT ``file_name`` of a medium: its relative ``filePath`` for a file inside the package, else
    ``<deploymentID>/<fileName>`` (camera file names repeat across deployments), with the medium's id when it has none."""
    file_path = str(row["filePath"])
    if not is_url(file_path):
        posix = file_path.replace("\\", "/")
        return posix if all(part not in ("", ".") for part in posix.split("/")) else PurePosixPath(posix).as_posix()
    name = str(row.get("fileName") or "") or f"{row['mediaID']}{PurePosixPath(file_path.split('?')[0]).suffix}"
    return f"{row['deploymentID']}/{name}"


class ConfinedFolder:
    """A folder whose files are read only when they resolve inside it; resolved parent folders are cached (one
    ``realpath`` per folder, one ``lstat`` per file), so a package of a million media is checked in seconds."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root = folder.resolve()
        self.parents: dict[str, str] = {}

    def resolve(self, relative: str) -> Path | None:
        """The real path of ``folder / relative``; None when nothing is there (a medium not downloaded)."""
        folder, _, name = relative.rpartition("/")
        parent = self.parents.get(folder)
        if parent is None:
            parent = self.parents.setdefault(folder, str((self.folder / folder).resolve()))
        path = f"{parent}/{name}"
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISLNK(status.st_mode):
            return Path(path)
        try:
            return Path(path).resolve(strict=True)
        except FileNotFoundError:
            return None  # a dangling link: nothing to read, link or copy

    def inside(self, relative: str, where: str) -> Path | None:
        """The real path of ``folder / relative``, or None when nothing is there; a one-line ``DataError`` naming
        ``where`` when it leads out of the folder (through a symbolic link) or cannot be resolved."""
        try:
            resolved = self.resolve(relative)
        except (OSError, RuntimeError) as error:  # RuntimeError: a loop of symbolic links
            raise DataError(f"{where}: {shown(relative)} cannot be read ({getattr(error, 'strerror', None) or error})") from None
        if resolved is not None and not resolved.is_relative_to(self.root):
            raise DataError(f"{where}: {shown(relative)} leads out of {self.folder} through a symbolic link (refused: "
                            "only files inside it are read, linked or copied)")
        return resolved

    def file(self, relative: str, where: str) -> Path | None:
        """The regular file ``relative`` resolves to inside the folder, or None when it is not there; else a one-line
        ``DataError`` naming ``where`` (a link out of the folder, a FIFO, a device, a folder)."""
        resolved = self.inside(relative, where)
        if resolved is None:
            return None
        try:
            mode = os.stat(resolved).st_mode
        except OSError as error:
            raise DataError(f"{where}: {shown(relative)} cannot be read ({error.strerror or error})") from None
        if not stat.S_ISREG(mode):
            raise DataError(f"{where}: {shown(relative)} is {file_kind(mode)}, expected an image or video file")
        return resolved


def local_media(media: Any, folder: Path, path: Path) -> dict[str, Path]:
    """Every medium whose file is in ``folder`` (``mediaID`` -> its real path), each checked by ``ConfinedFolder.file``
    (``path``: media.csv, for the row in a refusal); media not there are left out (remote, or not downloaded)."""
    confined = ConfinedFolder(folder)
    found = {}
    for i, row in enumerate(media_rows(media)):
        column = "fileName" if is_url(str(row["filePath"])) else "filePath"
        file = confined.file(media_file_name(row), f"{path}: row {i + 2}: {column}")
        if file is not None:
            found[str(row["mediaID"])] = file
    return found
