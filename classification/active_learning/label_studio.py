"""Label Studio round trip: a project config, tasks for local images, and labels read back.

Images are served by Label Studio's local-files storage: the server runs with
``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<folder>``; the image root must be a *subfolder*
of that document root (Label Studio refuses a storage equal to it), and its path relative
to the document root is the ``document_root_prefix`` (e.g. ``images``). Each task keeps the
image's relative path in ``data.path``, so reading labels back never depends on parsing
URLs; URL-encoded ``?d=`` paths are still understood when ``path`` is missing.

Exports: ``JSON_MIN`` has one row per annotation (``label``, ``annotator``); tasks that were
only cancelled are absent from it and tasks nobody labelled appear without ``label``. The
full ``JSON`` export (tasks with ``annotations[].result[].value.choices`` and
``was_cancelled``) is read as well. Both go through the same majority vote
(``labels.resolve_votes``).

``LabelStudioClient`` talks to a server with ``label-studio-sdk``; the URL and API key come
from ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` in the environment, else a ``.env``
file. The key is handed only to the SDK: it is never printed, logged or written.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, quote, urlsplit
from xml.sax.saxutils import quoteattr

from classification.active_learning.labels import (
    LabelImport,
    LabelMatcher,
    PathMatcher,
    Vote,
    build_label_import,
    label_name_list,
    normalize_path,
)
from classification.errors import DataError, UserError
from classification.io import JSON_KINDS, read_json, shown_value, write_json_atomic, write_text_atomic
from classification.redaction import check_token, read_env_file, register_secret

DEFAULT_URL = "http://localhost:8080"
LOCAL_FILES_URL = "/data/local-files/?d="
IMAGE_FIELD = "image"
CHOICE_NAME = "label"
PATH_FIELD = "path"


def labelling_config(
    label_names: Iterable[str] | Mapping[str, str], image_field: str = IMAGE_FIELD, choice_name: str = CHOICE_NAME
) -> str:
    """A Label Studio labelling config: one image, one single choice among the class names."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in label_name_list(label_names))
    return (
        "<View>\n"
        f"  <Image name={quoteattr(image_field)} value={quoteattr('$' + image_field)}/>\n"
        f'  <Choices name={quoteattr(choice_name)} toName={quoteattr(image_field)} choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def local_files_url(relative_path: str, document_root_prefix: str = "") -> str:
    """``/data/local-files/?d=<prefix>/<path>`` (URL-quoted) for an image under the image root."""
    full = "/".join(part for part in (normalize_path(document_root_prefix), normalize_path(relative_path)) if part)
    return LOCAL_FILES_URL + quote(full)


def build_tasks(
    relative_paths: Iterable[str], document_root_prefix: str = "", image_field: str = IMAGE_FIELD
) -> list[dict[str, Any]]:
    """One task per image: ``{"data": {"image": <url>, "path": <relative path>}}``."""
    paths = [path for path in dict.fromkeys(normalize_path(path) for path in relative_paths) if path]
    return [{"data": {image_field: local_files_url(path, document_root_prefix), PATH_FIELD: path}} for path in paths]


def write_tasks_json(path: str | Path, relative_paths: Iterable[str], document_root_prefix: str = "") -> None:
    """Write the tasks as a JSON file to import through Label Studio's web page (atomically)."""
    write_json_atomic(path, build_tasks(relative_paths, document_root_prefix))


def path_from_url(url: str, document_root_prefix: str = "") -> str | None:
    """The relative path in a local-files URL (``...?d=<prefix>/<path>``), or a plain path as is."""
    parts = urlsplit(url)
    if "d" in parse_qs(parts.query):
        path = normalize_path(parse_qs(parts.query)["d"][0])
    elif parts.scheme or url.startswith("/data/"):
        return None
    else:
        path = normalize_path(url)
    prefix = normalize_path(document_root_prefix)
    if prefix:
        if not path.startswith(prefix + "/"):
            return None
        path = path[len(prefix) + 1 :]
    return path or None


def task_path(data: Mapping[str, Any], image_field: str, document_root_prefix: str) -> str | None:
    """The image's relative path from a task's data: ``path`` if present, else from the image URL."""
    if isinstance(data.get(PATH_FIELD), str) and data[PATH_FIELD].strip():
        return normalize_path(data[PATH_FIELD])
    if isinstance(data.get(image_field), str):
        return path_from_url(data[image_field], document_root_prefix)
    return None


def choice_leaves(value: Any) -> list[Any]:
    """The choices in a JSON_MIN value: ``"deer"``, ``["deer"]`` or ``{"choices": ["deer"]}``; what is not text
    (a number, an object without ``choices``) is kept as it is, so the reader can say why it is no label."""
    if value is None:
        return []
    if isinstance(value, Mapping) and "choices" in value:
        return choice_leaves(value["choices"])
    if isinstance(value, list):
        return [leaf for element in value for leaf in choice_leaves(element)]
    return [value]


def single_choice(leaves: list[Any]) -> tuple[str | None, str]:
    """``(the one non-empty choice, "")``, else ``(None, why there is none)``: the reason the skip is reported with."""
    odd = [leaf for leaf in leaves if not isinstance(leaf, str)]
    if odd:
        return None, f"not a label: {JSON_KINDS.get(type(odd[0]), 'an object')}"
    distinct = {leaf.strip(): leaf for leaf in reversed(leaves) if leaf.strip()}
    if len(distinct) > 1:
        return None, "several different choices in one annotation"
    return (next(iter(distinct.values())), "") if distinct else (None, "no choice")


def annotator_name(value: Any, users: Mapping[int, str]) -> str:
    """An annotator as text: an email if known, else the user id; "" when missing."""
    if isinstance(value, Mapping):
        value = value.get("email") or value.get("id")
    if value is None:
        return ""
    if isinstance(value, int) and value in users:
        return users[value]
    return str(value)


Choice = tuple[str | None, str]  # (the label, or None and why there is none)


@dataclass
class _Gathered:
    """What a reader collected before the vote: votes and choice-less rows (with why) per path, unmatched rows."""

    votes: dict[str, list[Vote]] = field(default_factory=dict)
    no_choice: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    def add(self, path: str, choice: Choice, annotator: str) -> None:
        """Record one annotation (or a row without a usable choice, and why) for a matched path."""
        label, reason = choice
        if label is None:
            self.no_choice.setdefault(path, reason)
        else:
            self.votes.setdefault(path, []).append((label, annotator))


def _row_choices(row: Mapping[str, Any], choice_name: str) -> list[tuple[Choice, Any]]:
    """``(choice, annotator)`` per annotation of one export row (JSON_MIN row or full JSON task)."""
    if isinstance(row.get("annotations"), list) and isinstance(row.get("data"), Mapping):
        found: list[tuple[Choice, Any]] = []
        for annotation in row["annotations"]:
            if not isinstance(annotation, Mapping):
                continue
            if annotation.get("was_cancelled"):
                found.append(((None, "cancelled"), annotation.get("completed_by")))
                continue
            results = [
                r
                for r in annotation.get("result") or []
                if isinstance(r, Mapping) and r.get("from_name") == choice_name
            ]
            leaves = [v for r in results for v in choice_leaves(r.get("value"))]
            found.append((single_choice(leaves), annotation.get("completed_by")))
        return found or [((None, "not annotated"), None)]
    return [(single_choice(choice_leaves(row.get(choice_name))), row.get("annotator"))]


ANNOTATION_FIELDS = ("annotator", "annotation_id", "lead_time", "created_at", "updated_at")


def _list_field(mapping: Mapping[str, Any], name: str) -> list[Any]:
    """``mapping[name]`` when it is a list, else an empty list."""
    value = mapping.get(name)
    return value if isinstance(value, list) else []


def result_names(rows: Sequence[Any]) -> set[str]:
    """The ``from_name`` of every annotation result in full ``JSON`` export rows."""
    return {str(result.get("from_name")) for row in rows if isinstance(row, Mapping)
            for annotation in _list_field(row, "annotations") if isinstance(annotation, Mapping)
            for result in _list_field(annotation, "result") if isinstance(result, Mapping)}


def check_choice_field(rows: Sequence[Any], choice_name: str, where: str) -> None:
    """Refuse an export that has annotations but never the choices field ``choice_name`` (a labelling config
    with another ``<Choices name>``): every image would read as skipped, with no hint why."""
    expected = f"expected the choices field {choice_name!r} (<Choices name={quoteattr(choice_name)}> of the labelling config)"
    minimal = [row for row in rows if isinstance(row, Mapping) and not isinstance(row.get("annotations"), list)]
    annotated = [row for row in minimal if any(key in row for key in ANNOTATION_FIELDS)]
    if annotated and not any(choice_name in row for row in minimal):
        found = ", ".join(sorted({str(key) for row in annotated for key in row}))
        raise DataError(f"{where}: no row has a {choice_name!r} field: {expected}; fields found: {shown_value(found, 300)}")
    names = result_names(rows)
    if names and choice_name not in names:
        raise DataError(f"{where}: no annotation result comes from {choice_name!r}: {expected}; "
                        f"from_name found: {shown_value(', '.join(sorted(names)), 300)}")


def parse_label_studio_rows(
    rows: Any,
    label_names: Iterable[str] | Mapping[str, str],
    requested_paths: Iterable[str] | None,
    source: str,
    where: str,
    document_root_prefix: str = "",
    image_field: str = IMAGE_FIELD,
    choice_name: str = CHOICE_NAME,
    users: Mapping[int, str] | None = None,
) -> LabelImport:
    """Labels from exported rows (JSON_MIN or JSON); ``where`` names the file or project in errors."""
    if not isinstance(rows, list):
        raise DataError(f"{where}: expected a list of exported tasks, found {type(rows).__name__}")
    check_choice_field(rows, choice_name, where)
    labels, paths, gathered = LabelMatcher(label_names), PathMatcher(requested_paths), _Gathered()
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: [{index}]: expected an object, found {type(row).__name__}")
        data = row["data"] if isinstance(row.get("data"), Mapping) else row
        raw_path = task_path(data, image_field, document_root_prefix)
        path = paths.match(raw_path) if raw_path else None
        if path is None:
            described = raw_path or str(data.get(image_field) or f"task {row.get('id', index)}")
            if described not in gathered.unmatched:
                gathered.unmatched.append(described)
            continue
        for choice, annotator in _row_choices(row, choice_name):
            gathered.add(path, choice, annotator_name(annotator, users or {}))
    return build_label_import(gathered.votes, gathered.no_choice, gathered.unmatched, source, labels, paths)


def read_json_min(
    path: str | Path,
    label_names: Iterable[str] | Mapping[str, str],
    requested_paths: Iterable[str] | None,
    document_root_prefix: str = "",
    image_field: str = IMAGE_FIELD,
    choice_name: str = CHOICE_NAME,
) -> LabelImport:
    """Labels from a Label Studio export file (``JSON_MIN``, or the full ``JSON`` format)."""
    rows = read_json(path)
    return parse_label_studio_rows(
        rows,
        label_names,
        requested_paths,
        f"label_studio_export:{path}",
        str(path),
        document_root_prefix,
        image_field,
        choice_name,
    )


@dataclass(frozen=True)
class LabelStudioSettings:
    """Where the server is and the API key (the key never appears in a repr)."""

    url: str
    api_key: str | None = field(default=None, repr=False)


def load_label_studio_settings(env_file: str | Path | None = None) -> LabelStudioSettings:
    """``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` from the environment, else ``env_file`` or ./.env."""
    sources: list[tuple[str, Mapping[str, str | None]]] = [("the environment", os.environ)]
    candidate = Path(env_file) if env_file is not None else Path.cwd() / ".env"
    if candidate.exists():  # a FIFO or an oversized file is refused in one line by read_env_file
        sources.append((str(candidate), read_env_file(candidate)))
    elif env_file is not None:
        raise UserError(f"{candidate}: .env file not found")
    found = {
        name: next(((where, s[name]) for where, s in sources if s.get(name)), None)
        for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")
    }
    key = found["LABEL_STUDIO_API_KEY"]
    if key is not None:  # a key that is not a plain token is one line before the SDK puts it in a header
        register_secret(check_token("LABEL_STUDIO_API_KEY", str(key[1]), key[0]))
    url = found["LABEL_STUDIO_URL"]
    return LabelStudioSettings(str(url[1]) if url else DEFAULT_URL, str(key[1]) if key else None)


def _api_error_detail(body: Any) -> str:
    """A short reason from a Label Studio error body (never its headers, which carry cookies)."""
    if isinstance(body, Mapping):
        errors = body.get("validation_errors")
        if errors:
            return f"{body.get('detail', 'error')}: {json.dumps(errors, ensure_ascii=False)}"
        return str(body.get("detail") or "")[:300]
    return str(body or "")[:300]


class LabelStudioClient:
    """A Label Studio server through ``label-studio-sdk``: projects, tasks, exports, labels.

    Failures (no server, refused key, rejected request) are one-line ``UserError``s naming
    the URL; the key is never in them.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        env_file: str | Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        """Connect and check the key (``/api/current-user/whoami``); arguments win over the environment."""
        settings = load_label_studio_settings(env_file)
        self.url = (url or settings.url).rstrip("/")
        key = check_token("LABEL_STUDIO_API_KEY", api_key, "the api_key argument") if api_key else settings.api_key
        register_secret(key)
        if not key:
            raise UserError(
                f"Label Studio at {self.url}: no API key; set LABEL_STUDIO_API_KEY in the environment or .env"
            )
        self._key = key
        try:
            with warnings.catch_warnings():  # the SDK's own pydantic-v1 deprecation warnings
                warnings.simplefilter("ignore", DeprecationWarning)
                from label_studio_sdk import LabelStudio  # noqa: PLC0415 - optional and slow to import: only on connect
        except ImportError:
            raise UserError("label-studio-sdk is not installed: pip install label-studio-sdk==2.0.19") from None
        with self._calling("connect"):
            self._sdk = LabelStudio(base_url=self.url, api_key=key, timeout=timeout)
            self.user_email = str(self._sdk.users.whoami().email or "")

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r})"

    @contextmanager
    def _calling(self, action: str) -> Iterator[None]:
        """Turn SDK/HTTP failures into a one-line ``UserError`` (the key scrubbed, just in case)."""
        import httpx  # noqa: PLC0415 - the SDK's dependency: only once a client is connected
        from label_studio_sdk.core.api_error import ApiError  # noqa: PLC0415

        try:
            yield
        except ApiError as error:
            if error.status_code in (401, 403):
                reason = "the API key was refused; check LABEL_STUDIO_API_KEY"
            else:
                reason = _api_error_detail(error.body)
            raise UserError(
                self._scrub(f"Label Studio at {self.url}: {action}: HTTP {error.status_code}: {reason}")
            ) from None
        except httpx.HTTPError as error:
            raise UserError(
                self._scrub(
                    f"Label Studio at {self.url}: {action}: cannot reach the server ({type(error).__name__}: {error})"
                )
            ) from None
        except json.JSONDecodeError:
            raise UserError(
                f"Label Studio at {self.url}: {action}: the server did not answer with JSON (is this Label Studio?)"
            ) from None

    def _scrub(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        return text.replace(self._key, "***") if self._key else text

    def create_project(
        self, title: str, label_names: Iterable[str] | Mapping[str, str], image_folder: str | Path | None = None
    ) -> int:
        """Create a project labelling one class per image; ``image_folder`` (on the server) lets it show local files."""
        config = labelling_config(label_names)
        with self._calling("create project"):
            project = self._sdk.projects.create(title=title, label_config=config)
        if project.id is None:
            raise UserError(f"Label Studio created project {title!r} without an id")
        if image_folder is not None:
            self.add_local_storage(int(project.id), image_folder)
        return int(project.id)

    def add_local_storage(self, project_id: int, image_folder: str | Path) -> None:
        """Let the project serve files from ``image_folder``, a subfolder of the server's document root."""
        with self._calling(f"project {project_id}: add local storage {image_folder}"):
            self._sdk.import_storage.local.create(
                project=project_id, path=str(image_folder), use_blob_urls=True, title="images"
            )

    def import_tasks(self, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
        """Add tasks (see ``build_tasks``) to a project; returns their task ids."""
        with self._calling(f"project {project_id}: import {len(tasks)} tasks"):
            response = self._sdk.projects.import_tasks(  # the SDK validates plain task dicts into its request model
                project_id, request=cast(Any, [dict(task) for task in tasks]), return_task_ids=True
            )
        task_ids = getattr(response, "task_ids", None) or []  # an extra field, sent because of return_task_ids
        return [int(task_id) for task_id in task_ids]

    def export_json_min(self, project_id: int) -> list[dict[str, Any]]:
        """The project's ``JSON_MIN`` export, all tasks included (one row per annotation)."""
        with self._calling(f"project {project_id}: export JSON_MIN"):
            chunks = self._sdk.projects.exports.download_sync(
                project_id, export_type="JSON_MIN", download_all_tasks=True, download_resources=False
            )
            rows = json.loads(b"".join(chunks))
        if not isinstance(rows, list):
            raise DataError(f"Label Studio at {self.url}: project {project_id}: the JSON_MIN export is not a list")
        return rows

    def users(self) -> dict[int, str]:
        """User id -> email, to name annotators in ``JSON_MIN`` (which gives ids)."""
        with self._calling("list users"):
            return {int(user.id): str(user.email or user.id) for user in self._sdk.users.list()}

    def read_project_labels(
        self,
        project_id: int,
        label_names: Iterable[str] | Mapping[str, str],
        requested_paths: Iterable[str] | None,
        document_root_prefix: str = "",
        keep_copy: Path | None = None,
    ) -> LabelImport:
        """Export the project (``JSON_MIN``) and read its labels for the requested paths; ``keep_copy``:
        write the export there first (atomically), so what was read is kept even when reading it fails."""
        rows = self.export_json_min(project_id)
        if keep_copy is not None:
            write_text_atomic(keep_copy, json.dumps(rows, ensure_ascii=False))
        return parse_label_studio_rows(
            rows,
            label_names,
            requested_paths,
            f"label_studio:{project_id}",
            f"Label Studio at {self.url}: project {project_id}",
            document_root_prefix,
            users=self.users(),
        )
