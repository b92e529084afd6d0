"""Camtrap DP 1.0.2 table schemas, bundled, and an offline validator built on ``frictionless``.

A Camtrap DP package names its table schemas and its profile by remote URL
(``https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/...``), which a machine without
internet cannot fetch. The fields, types and constraints of the three tables are written out
here (names, order, required, unique, enums, ranges, patterns, date-time format, primary and
foreign keys, as the standard defines them), and ``validate_camtrap_dp`` checks a package
against them with frictionless, plus what the profile requires of ``datapackage.json``.

Why not the PyPI packages: ``trap-schema`` (pydantic models of 1.0.2) needs Python >= 3.12
and pandas >= 3 with PEP 695 syntax, so it cannot run on the Python 3.11 this project
supports; ``camtrapdp`` 0.1.0 is plain dataclasses that read and write CSV and check nothing.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from classification.data.camtrap_dp_media import ConfinedFolder
from classification.io import read_json

VERSION = "1.0.2"
BASE_URL = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}"
PROFILE_URL = f"{BASE_URL}/camtrap-dp-profile.json"
TABLES = ("deployments", "media", "observations")
DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # ISO 8601 with a timezone designator (Z or +hh:mm)

# (name, type, constraints) in the standard's column order; {"required": True} marks required fields.
_REQUIRED: dict[str, Any] = {"required": True}
DEPLOYMENT_FIELDS: list[tuple[str, str, dict[str, Any]]] = [
    ("deploymentID", "string", {"required": True, "unique": True}),
    ("locationID", "string", {}),
    ("locationName", "string", {}),
    ("latitude", "number", {"required": True, "minimum": -90, "maximum": 90}),
    ("longitude", "number", {"required": True, "minimum": -180, "maximum": 180}),
    ("coordinateUncertainty", "integer", {"minimum": 1}),
    ("deploymentStart", "datetime", _REQUIRED),
    ("deploymentEnd", "datetime", _REQUIRED),
    ("setupBy", "string", {}),
    ("cameraID", "string", {}),
    ("cameraModel", "string", {}),
    ("cameraDelay", "integer", {"minimum": 0}),
    ("cameraHeight", "number", {"minimum": 0}),
    ("cameraDepth", "number", {"minimum": 0}),
    ("cameraTilt", "integer", {"minimum": -90, "maximum": 90}),
    ("cameraHeading", "integer", {"minimum": 0, "maximum": 360}),
    ("detectionDistance", "number", {"minimum": 0}),
    ("timestampIssues", "boolean", {}),
    ("baitUse", "boolean", {}),
    ("featureType", "string", {"enum": ["roadPaved", "roadDirt", "trailHiking", "trailGame", "roadUnderpass", "roadOverpass",
                                        "roadBridge", "culvert", "burrow", "nestSite", "carcass", "waterSource", "fruitingTree"]}),
    ("habitat", "string", {}),
    ("deploymentGroups", "string", {}),
    ("deploymentTags", "string", {}),
    ("deploymentComments", "string", {}),
]
MEDIA_FIELDS: list[tuple[str, str, dict[str, Any]]] = [
    ("mediaID", "string", {"required": True, "unique": True}),
    ("deploymentID", "string", _REQUIRED),
    ("captureMethod", "string", {"enum": ["activityDetection", "timeLapse"]}),
    ("timestamp", "datetime", _REQUIRED),
    # a URL or a path relative to datapackage.json: not starting with . / ~ and without ".."
    ("filePath", "string", {"required": True, "pattern": r"^(?=^[^./~])(^((?!\.{2}).)*$).*$"}),
    ("filePublic", "boolean", _REQUIRED),
    ("fileName", "string", {}),
    ("fileMediatype", "string", {"required": True, "pattern": "^(image|video|audio)/.*$"}),
    ("exifData", "object", {}),
    ("favorite", "boolean", {}),
    ("mediaComments", "string", {}),
]
OBSERVATION_TYPES = ("animal", "human", "vehicle", "blank", "unknown", "unclassified")
OBSERVATION_FIELDS: list[tuple[str, str, dict[str, Any]]] = [
    ("observationID", "string", {"required": True, "unique": True}),
    ("deploymentID", "string", _REQUIRED),
    ("mediaID", "string", {}),
    ("eventID", "string", {}),
    ("eventStart", "datetime", _REQUIRED),
    ("eventEnd", "datetime", _REQUIRED),
    ("observationLevel", "string", {"required": True, "enum": ["media", "event"]}),
    ("observationType", "string", {"required": True, "enum": list(OBSERVATION_TYPES)}),
    ("cameraSetupType", "string", {"enum": ["setup", "calibration"]}),
    ("scientificName", "string", {}),
    ("count", "integer", {"minimum": 1}),
    ("lifeStage", "string", {"enum": ["adult", "subadult", "juvenile"]}),
    ("sex", "string", {"enum": ["female", "male"]}),
    ("behavior", "string", {}),
    ("individualID", "string", {}),
    ("individualPositionRadius", "number", {"minimum": 0}),
    ("individualPositionAngle", "number", {"minimum": -90, "maximum": 90}),
    ("individualSpeed", "number", {"minimum": 0}),
    ("bboxX", "number", {"minimum": 0, "maximum": 1}),
    ("bboxY", "number", {"minimum": 0, "maximum": 1}),
    ("bboxWidth", "number", {"minimum": 1e-15, "maximum": 1}),
    ("bboxHeight", "number", {"minimum": 1e-15, "maximum": 1}),
    ("classificationMethod", "string", {"enum": ["human", "machine"]}),
    ("classifiedBy", "string", {}),
    ("classificationTimestamp", "datetime", {}),
    ("classificationProbability", "number", {"minimum": 0, "maximum": 1}),
    ("observationTags", "string", {}),
    ("observationComments", "string", {}),
]
FIELDS = {"deployments": DEPLOYMENT_FIELDS, "media": MEDIA_FIELDS, "observations": OBSERVATION_FIELDS}
PRIMARY_KEYS = {"deployments": "deploymentID", "media": "mediaID", "observations": "observationID"}
FOREIGN_KEYS = {
    "deployments": [],
    "media": [("deploymentID", "deployments")],
    "observations": [("deploymentID", "deployments"), ("mediaID", "media")],
}
SAMPLING_DESIGNS = ("simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted", "opportunistic")
MAX_PROBLEMS = 50


def column_names(table: str) -> list[str]:
    """The columns of a Camtrap DP table, in the standard's order."""
    return [name for name, _, _ in FIELDS[table]]


def schema_url(table: str) -> str:
    """The remote URL a package names as a table's schema."""
    return f"{BASE_URL}/{table}-table-schema.json"


def table_schema(table: str) -> dict[str, Any]:
    """The frictionless Table Schema descriptor of one table."""
    fields = []
    for name, kind, constraints in FIELDS[table]:
        field: dict[str, Any] = {"name": name, "type": kind}
        if kind == "datetime":
            field["format"] = DATETIME_FORMAT
        if constraints:
            field["constraints"] = dict(constraints)
        fields.append(field)
    foreign = [{"fields": column, "reference": {"resource": target, "fields": PRIMARY_KEYS[target]}}
               for column, target in FOREIGN_KEYS[table]]
    return {"fields": fields, "missingValues": [""], "primaryKey": [PRIMARY_KEYS[table]], "foreignKeys": foreign}


def resource_descriptor(table: str) -> dict[str, Any]:
    """The ``resources`` entry of one table in ``datapackage.json``, as the standard writes it."""
    return {"name": table, "path": f"{table}.csv", "profile": "tabular-data-resource", "format": "csv",
            "mediatype": "text/csv", "encoding": "utf-8", "schema": schema_url(table)}


# ---------------------------------------------------------------- validation


def is_timestamp(value: Any) -> bool:
    """True for an ISO 8601 date-time with a timezone designator."""
    try:
        return isinstance(value, str) and datetime.strptime(value, DATETIME_FORMAT).tzinfo is not None
    except ValueError:
        return False


def _project_problems(project: Any) -> list[str]:
    """What the profile requires of ``project``."""
    if not isinstance(project, dict):
        return ["project: missing or not an object"]
    problems = []
    if not isinstance(project.get("title"), str):
        problems.append("project.title: missing")
    if project.get("samplingDesign") not in SAMPLING_DESIGNS:
        problems.append(f"project.samplingDesign: must be one of {', '.join(SAMPLING_DESIGNS)}")
    captures = project.get("captureMethod")
    if not isinstance(captures, list) or not captures or not set(captures) <= {"activityDetection", "timeLapse"}:
        problems.append("project.captureMethod: must be a list of activityDetection, timeLapse")
    if not isinstance(project.get("individualAnimals"), bool):
        problems.append("project.individualAnimals: must be true or false")
    levels = project.get("observationLevel")
    if not isinstance(levels, list) or not levels or not set(levels) <= {"media", "event"}:
        problems.append("project.observationLevel: must be a list of media, event")
    return problems


def descriptor_problems(descriptor: Any) -> list[str]:
    """What the Camtrap DP profile requires of ``datapackage.json`` (the keys, their types and vocabularies)."""
    if not isinstance(descriptor, dict):
        return ["expected a JSON object"]
    problems = []
    if descriptor.get("profile") != PROFILE_URL:
        problems.append(f"profile: expected {PROFILE_URL}, got {descriptor.get('profile')!r}")
    resources = {r.get("name"): r for r in descriptor.get("resources") or [] if isinstance(r, dict)}
    for table in TABLES:
        if resources.get(table, {}).get("path") != f"{table}.csv" or resources[table].get("schema") != schema_url(table):
            problems.append(f"resources: needs {table} with path {table}.csv and schema {schema_url(table)}")
    if not is_timestamp(descriptor.get("created")):
        problems.append(f"created: expected an ISO 8601 date-time with timezone, got {descriptor.get('created')!r}")
    contributors = descriptor.get("contributors")
    if not isinstance(contributors, list) or not contributors or not all(isinstance(c, dict) and c.get("title") for c in contributors):
        problems.append("contributors: expected a non-empty list of objects with a title")
    problems += _project_problems(descriptor.get("project"))
    if not isinstance(descriptor.get("spatial"), dict):
        problems.append("spatial: expected a GeoJSON object")
    temporal = descriptor.get("temporal")
    if not isinstance(temporal, dict) or not temporal.get("start") or not temporal.get("end"):
        problems.append("temporal: expected start and end")
    taxonomic = descriptor.get("taxonomic")
    if not isinstance(taxonomic, list) or not all(isinstance(t, dict) and t.get("scientificName") for t in taxonomic):
        problems.append("taxonomic: expected a list of objects with a scientificName")
    return problems


def table_problems(root: Path) -> list[str]:
    """Every table checked against its bundled schema by frictionless, foreign keys included."""
    from frictionless import Package, Resource, Schema  # noqa: PLC0415 - frictionless is slow to import; only validation needs it

    resources = [Resource(path=f"{table}.csv", basepath=str(root), name=table, schema=Schema.from_descriptor(table_schema(table)))
                 for table in TABLES]
    report = Package(resources=resources).validate(limit_errors=MAX_PROBLEMS)
    problems = []
    for task in report.tasks:
        for error in task.errors:
            row = getattr(error, "row_number", None)
            field = getattr(error, "field_name", None)
            where = f"{task.name}.csv" + (f": row {row}" if row else "") + (f": {field}" if field else "")
            problems.append(f"{where}: {error.type}: {error.note or error.message}")
    for error in report.errors:
        problems.append(f"datapackage: {error.type}: {error.message}")
    return problems


def observation_level_problems(root: Path) -> list[str]:
    """Rules of the standard that its table schemas do not encode: a media-level observation names its media."""
    import csv  # noqa: PLC0415 - only this check reads the CSV row by row

    problems = []
    with open(root / "observations.csv", encoding="utf-8", newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            if row.get("observationLevel") == "media" and not row.get("mediaID"):
                problems.append(f"observations.csv: row {line}: mediaID: required when observationLevel is media")
            start, end = row.get("eventStart", ""), row.get("eventEnd", "")
            if is_timestamp(start) and is_timestamp(end) and \
                    datetime.strptime(end, DATETIME_FORMAT) < datetime.strptime(start, DATETIME_FORMAT):
                problems.append(f"observations.csv: row {line}: eventEnd: before eventStart")
            if len(problems) >= MAX_PROBLEMS:
                break
    return problems


def validate_camtrap_dp(package_dir: str | Path) -> list[str]:
    """Every problem (up to ~50 per kind) that makes a folder an invalid Camtrap DP 1.0.2 package; empty when valid.

    Offline: the tables are checked against the schemas bundled here, not the remote ones.
    """
    root = Path(package_dir)
    confined = ConfinedFolder(root)  # a table linked out of the package is refused, not read (its cells reach messages)
    for name in ("datapackage.json", *(f"{table}.csv" for table in TABLES)):
        confined.inside(name, str(root))
    problems = [f"datapackage.json: {p}" for p in descriptor_problems(read_json(root / "datapackage.json"))]
    missing = [table for table in TABLES if not (root / f"{table}.csv").is_file()]
    if missing:
        return problems + [f"{table}.csv: file not found" for table in missing]
    return problems + table_problems(root) + observation_level_problems(root)
