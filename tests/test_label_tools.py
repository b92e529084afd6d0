"""Label-tool round trips: Label Studio (config, tasks, exports, a real server), Timelapse CSVs, Lightly files."""

from __future__ import annotations

import csv
import json
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classification.active_learning.label_studio import (
    LabelStudioClient,
    LabelStudioSettings,
    build_tasks,
    labelling_config,
    load_label_studio_settings,
    local_files_url,
    path_from_url,
    read_json_min,
)
from classification.active_learning.labels import LabelImport, ReceivedLabel, resolve_votes
from classification.active_learning.lightly import read_embeddings_csv, write_embeddings_csv, write_lightly_predictions
from classification.active_learning.timelapse import read_timelapse_export, write_request_csv
from classification.errors import DataError, UserError
from tests.label_studio_server import LabelStudioServer, annotate

LABELS = ["agouti", "bird & co", "deer"]
LABEL_INDEX = {"0": "agouti", "1": "bird & co", "2": "deer"}


def write_json(path: Path, data: object) -> Path:
    """Write a JSON test fixture file."""
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --- Label Studio: config, URLs, tasks -------------------------------------------------


def test_labelling_config_is_valid_xml_with_one_escaped_choice_per_class() -> None:
    config = labelling_config(LABEL_INDEX)
    root = ET.fromstring(config)
    image = root.find("Image")
    choices = root.find("Choices")
    assert image is not None and image.attrib == {"name": "image", "value": "$image"}
    assert choices is not None
    assert choices.attrib == {"name": "label", "toName": "image", "choice": "single", "showInline": "true"}
    assert [choice.attrib["value"] for choice in choices] == LABELS
    assert 'value="bird &amp; co"' in config
    quoted = labelling_config(['say "hi" <now>'])
    assert ET.fromstring(quoted).find("Choices")[0].attrib["value"] == 'say "hi" <now>'  # type: ignore[index]


def test_labelling_config_rejects_empty_or_repeated_names() -> None:
    with pytest.raises(UserError, match="listed twice: deer"):
        labelling_config(["deer", "deer"])
    with pytest.raises(UserError, match="no class names"):
        labelling_config([])


def test_local_files_urls_and_tasks_keep_the_relative_path() -> None:
    assert local_files_url("cam03/2021/IMG_0042.JPG") == "/data/local-files/?d=cam03/2021/IMG_0042.JPG"
    assert local_files_url("cam 03\\IMG #1.JPG", "images/") == "/data/local-files/?d=images/cam%2003/IMG%20%231.JPG"
    tasks = build_tasks(["a/x.jpg", "b/x.jpg", "a/x.jpg"], "images")
    assert tasks == [
        {"data": {"image": "/data/local-files/?d=images/a/x.jpg", "path": "a/x.jpg"}},
        {"data": {"image": "/data/local-files/?d=images/b/x.jpg", "path": "b/x.jpg"}},
    ]
    assert (
        path_from_url("http://host:8080/data/local-files/?d=images/cam%2003/IMG%20%231.JPG", "images")
        == "cam 03/IMG #1.JPG"
    )
    assert path_from_url("/data/local-files/?d=other/x.jpg", "images") is None
    assert path_from_url("/data/upload/1/abc-x.jpg") is None


# --- Label Studio: reading exports -----------------------------------------------------


def min_row(
    task_id: int, path: str | None, label: object = None, annotator: object = None, url: str | None = None
) -> dict:
    """One JSON_MIN row as Label Studio writes it (data fields flattened into the row)."""
    row: dict = {"image": url or local_files_url(path or "", "images"), "id": task_id, "annotator": annotator}
    if path is not None:
        row["path"] = path
    if label is not None:
        row["label"] = label
    return row


def test_a_project_export_is_read_like_an_export_file_and_kept(tmp_path: Path) -> None:
    """The loop reads a project through ``read_project_labels`` (one reader): the export is kept first."""
    rows = [min_row(1, "cam03/IMG_0001.JPG", "deer", 7), min_row(2, "cam04/IMG_0002.JPG", None, 7)]
    client = LabelStudioClient.__new__(LabelStudioClient)  # no server: the two calls it makes, stubbed
    client.url = "http://127.0.0.1:9"
    client.export_json_min = lambda project_id: rows  # type: ignore[method-assign]
    client.users = lambda: {7: "a@example.com"}  # type: ignore[method-assign]
    kept = tmp_path / "imports" / "export.json"
    requested = ["cam03/IMG_0001.JPG", "cam04/IMG_0002.JPG"]
    result = client.read_project_labels(3, LABEL_INDEX, requested, keep_copy=kept)
    assert result.labels == [ReceivedLabel("cam03/IMG_0001.JPG", "deer", "a@example.com", "label_studio:3")]
    assert result.skipped == ["cam04/IMG_0002.JPG"] and json.loads(kept.read_text(encoding="utf-8")) == rows
    from_file = read_json_min(kept, LABEL_INDEX, requested)
    assert [(r.path, r.label) for r in from_file.labels] == [(r.path, r.label) for r in result.labels]


def test_json_min_choices_as_string_list_or_dict_and_same_basenames(tmp_path: Path) -> None:
    rows = [
        min_row(1, "cam03/IMG_0001.JPG", "deer", 1),
        min_row(2, "cam04/IMG_0001.JPG", ["agouti"], 1),
        min_row(3, "cam05/IMG_0001.JPG", {"choices": ["bird & co"]}, "a@example.com"),
    ]
    requested = ["cam03/IMG_0001.JPG", "cam04/IMG_0001.JPG", "cam05/IMG_0001.JPG"]
    result = read_json_min(write_json(tmp_path / "export.json", rows), LABEL_INDEX, requested)
    source = f"label_studio_export:{tmp_path / 'export.json'}"
    assert result.labels == [
        ReceivedLabel("cam03/IMG_0001.JPG", "deer", "1", source),
        ReceivedLabel("cam04/IMG_0001.JPG", "agouti", "1", source),
        ReceivedLabel("cam05/IMG_0001.JPG", "bird & co", "a@example.com", source),
    ]
    assert result.skipped == [] and result.conflicts == {} and result.unknown == {} and result.unmatched == []


def test_json_min_majority_tie_skips_unknown_and_unmatched(tmp_path: Path) -> None:
    rows = [
        # three annotators, 2-1 for deer
        min_row(1, "cam03/2021/IMG_0042.JPG", "deer", "a@example.com"),
        min_row(1, "cam03/2021/IMG_0042.JPG", "deer", "b@example.com"),
        min_row(1, "cam03/2021/IMG_0042.JPG", "agouti", "c@example.com"),
        # two annotators, 1-1 tie
        min_row(2, "cam04/2021/IMG_0042.JPG", "deer", "a@example.com"),
        min_row(2, "cam04/2021/IMG_0042.JPG", "agouti", "b@example.com"),
        # a task nobody labelled (JSON_MIN writes it without "label")
        min_row(3, "cam05/IMG_0001.JPG"),
        # a label that is not in the label index, and one that differs only in case
        min_row(4, "cam05/IMG_0002.JPG", "wolverine", "a@example.com"),
        min_row(5, "cam05/IMG_0003.JPG", " Deer", "a@example.com"),
        # no "path" in the data: the URL-encoded d= path is used
        {"image": "/data/local-files/?d=images/cam%2006/night%20shot.JPG", "id": 6, "label": "agouti", "annotator": 1},
        # an image nobody requested
        min_row(7, "cam09/IMG_0001.JPG", "deer", 1),
    ]
    requested = [
        "cam03/2021/IMG_0042.JPG",
        "cam04/2021/IMG_0042.JPG",
        "cam05/IMG_0001.JPG",
        "cam05/IMG_0002.JPG",
        "cam05/IMG_0003.JPG",
        "cam 06/night shot.JPG",
        "cam07/cancelled.JPG",
    ]
    result = read_json_min(write_json(tmp_path / "export.json", rows), LABELS, requested, document_root_prefix="images")
    assert result.label_by_path() == {
        "cam03/2021/IMG_0042.JPG": "deer",
        "cam05/IMG_0003.JPG": "deer",
        "cam 06/night shot.JPG": "agouti",
    }
    assert result.labels[0].annotator == "a@example.com,b@example.com"
    assert result.conflicts == {
        "cam03/2021/IMG_0042.JPG": {"agouti": 1, "deer": 2},
        "cam04/2021/IMG_0042.JPG": {"agouti": 1, "deer": 1},
    }
    assert result.ties() == ["cam04/2021/IMG_0042.JPG"]
    assert "cam04/2021/IMG_0042.JPG" not in result.label_by_path()
    assert result.unknown == {"cam05/IMG_0002.JPG": "wolverine"}
    assert result.renamed == {" Deer": "deer"}
    assert result.skipped == ["cam05/IMG_0001.JPG", "cam07/cancelled.JPG"]  # no choice; absent (cancelled)
    assert result.unmatched == ["cam09/IMG_0001.JPG"]
    assert result.summary().startswith("3 labelled, 2 skipped, 2 with disagreement (1 tied, not labelled), 1 with")


def test_full_json_export_with_cancelled_annotations(tmp_path: Path) -> None:
    def annotation(user: int, choices: list[str], cancelled: bool = False) -> dict:
        result = (
            []
            if cancelled
            else [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": choices}}]
        )
        return {"completed_by": user, "result": result, "was_cancelled": cancelled}

    tasks = [
        {
            "id": 1,
            "data": {"image": "x", "path": "a/1.jpg"},
            "annotations": [annotation(1, ["deer"]), annotation(2, [], True)],
        },
        {"id": 2, "data": {"image": "x", "path": "a/2.jpg"}, "annotations": [annotation(1, [], True)]},
        {"id": 3, "data": {"image": "x", "path": "a/3.jpg"}, "annotations": []},
        {"id": 4, "data": {"image": "x", "path": "a/4.jpg"}, "annotations": [annotation(1, ["deer", "agouti"])]},
    ]
    result = read_json_min(
        write_json(tmp_path / "full.json", tasks), LABELS, ["a/1.jpg", "a/2.jpg", "a/3.jpg", "a/4.jpg"]
    )
    assert result.label_by_path() == {"a/1.jpg": "deer"}
    assert result.skipped == ["a/2.jpg", "a/3.jpg", "a/4.jpg"]


def test_bad_export_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json: not valid JSON"):
        read_json_min(tmp_path / "a.json", LABELS, [])
    with pytest.raises(DataError, match=r"b\.json: expected a list"):
        read_json_min(write_json(tmp_path / "b.json", {"id": 1}), LABELS, [])
    with pytest.raises(DataError, match=r"c\.json: \[1\]: expected an object"):
        read_json_min(write_json(tmp_path / "c.json", [min_row(1, "a.jpg", "deer"), 3]), LABELS, [])


def test_resolve_votes() -> None:
    outcome = resolve_votes(
        {"a": [("deer", "x"), ("deer", "y"), ("fox", "z")], "b": [("deer", "x"), ("fox", "y")], "c": []}
    )
    assert outcome.winners == {"a": ("deer", "x,y")}
    assert outcome.conflicts == {"a": {"deer": 2, "fox": 1}, "b": {"deer": 1, "fox": 1}}


def test_settings_from_the_environment_else_a_dotenv_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_label_studio_settings() == LabelStudioSettings("http://localhost:8080", None)
    (tmp_path / ".env").write_text("LABEL_STUDIO_URL=http://ls:9000\nLABEL_STUDIO_API_KEY=from-dotenv\n")
    settings = load_label_studio_settings()
    assert settings == LabelStudioSettings("http://ls:9000", "from-dotenv") and "from-dotenv" not in repr(settings)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "from-env")
    assert load_label_studio_settings().api_key == "from-env"


def test_client_without_a_server_is_a_one_line_error_naming_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the client connects
    token = "f" * 40
    with pytest.raises(UserError) as caught:
        LabelStudioClient(f"http://127.0.0.1:{port}", api_key=token, timeout=5)
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}" in message and "cannot reach" in message
    assert token not in message and "\n" not in message


# --- Timelapse ----------------------------------------------------------------------------


def test_timelapse_round_trip(tmp_path: Path) -> None:
    requested = [
        "cam03/2021/IMG_0001.JPG",
        "cam04/2021/IMG_0001.JPG",
        "cam04/IMG_0002.JPG",
        "cam04/IMG_0003.JPG",
        "IMG_0004.JPG",
        "cam05/IMG_0005.JPG",
    ]
    write_request_csv(tmp_path / "request.csv", requested)
    with open(tmp_path / "request.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["File", "RelativePath", "Selected"]
    assert rows[1:3] == [["IMG_0001.JPG", "cam03\\2021", "true"], ["IMG_0001.JPG", "cam04\\2021", "true"]]
    assert rows[5] == ["IMG_0004.JPG", "", "true"]

    export = tmp_path / "TimelapseData.csv"
    header = ["File", "RelativePath", "DateTime", "DeleteFlag", "Species", "Count"]
    lines = [
        ["IMG_0001.JPG", "cam03\\2021", "2021-01-01 10:00:00", "false", "deer", "1"],
        ["IMG_0001.JPG", "cam04\\2021", "2021-01-01 10:00:00", "false", " Agouti ", "1"],
        ["IMG_0002.JPG", "cam04", "2021-01-02 10:00:00", "false", "wolverine", "1"],
        ["IMG_0003.JPG", "cam04", "2021-01-03 10:00:00", "false", "", "0"],
        ["IMG_0004.JPG", "", "2021-01-04 10:00:00", "false", "bird & co", "2"],
        ["IMG_0009.JPG", "cam09", "2021-01-09 10:00:00", "false", "deer", "1"],
    ]
    with open(export, "w", encoding="utf-8-sig", newline="") as handle:  # Timelapse writes a BOM
        csv.writer(handle, lineterminator="\r\n").writerows([header, *lines])
    result = read_timelapse_export(export, LABEL_INDEX, requested)
    source = f"timelapse:{export}"
    assert result.labels == [
        ReceivedLabel("cam03/2021/IMG_0001.JPG", "deer", "", source),
        ReceivedLabel("cam04/2021/IMG_0001.JPG", "agouti", "", source),
        ReceivedLabel("IMG_0004.JPG", "bird & co", "", source),
    ]
    assert result.unknown == {"cam04/IMG_0002.JPG": "wolverine"}
    assert result.skipped == ["cam04/IMG_0003.JPG", "cam05/IMG_0005.JPG"]
    assert result.unmatched == ["cam09/IMG_0009.JPG"]
    assert result.renamed == {"Agouti": "agouti"}
    assert "labels matched ignoring case/spaces: 'Agouti' -> 'agouti'" in result.summary()


def test_timelapse_posix_separators_and_missing_label_column(tmp_path: Path) -> None:
    export = tmp_path / "export.csv"
    export.write_text("File,RelativePath,Species\nIMG_1.JPG,cam03/2021,deer\n", encoding="utf-8")
    assert read_timelapse_export(export, LABELS, ["cam03/2021/IMG_1.JPG"]).label_by_path() == {
        "cam03/2021/IMG_1.JPG": "deer"
    }
    with pytest.raises(DataError) as caught:
        read_timelapse_export(export, LABELS, [], label_column="Animal")
    assert str(caught.value) == f"{export}: no column 'Animal'; the columns are: File, RelativePath, Species"
    with pytest.raises(DataError, match="file not found"):
        read_timelapse_export(tmp_path / "missing.csv", LABELS, [])
    cut = tmp_path / "cut.csv"  # an export cut short mid-row: refused, not read with the row's label empty
    cut.write_text("File,RelativePath,Species\nIMG_1.JPG,cam03/2021,deer\nIMG_2.JPG,cam03", encoding="utf-8")
    with pytest.raises(DataError, match="cut short"):
        read_timelapse_export(cut, LABELS, ["cam03/2021/IMG_1.JPG"])
    bom = tmp_path / "bom.csv"
    bom.write_text("File,RelativePath,Species\nIMG_1.JPG,cam03/2021,deer\n", encoding="utf-8-sig")
    assert read_timelapse_export(bom, LABELS, ["cam03/2021/IMG_1.JPG"]).label_by_path() == {"cam03/2021/IMG_1.JPG": "deer"}


# --- Lightly ------------------------------------------------------------------------------


def test_lightly_predictions_layout(tmp_path: Path) -> None:
    names = ["cam03/IMG_0001.JPG", "cam04/IMG_0001.JPG", "root.png"]
    probs = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    files = write_lightly_predictions(tmp_path, "species", names, probs, LABELS)
    root = tmp_path / ".lightly" / "predictions"
    assert files == [
        root / "species/cam03/IMG_0001.json",
        root / "species/cam04/IMG_0001.json",
        root / "species/root.json",
    ]
    assert json.loads((root / "tasks.json").read_text()) == ["species"]
    assert json.loads((root / "species/schema.json").read_text()) == {
        "task_type": "classification",
        "categories": [{"id": 0, "name": "agouti"}, {"id": 1, "name": "bird & co"}, {"id": 2, "name": "deer"}],
    }
    assert json.loads(files[1].read_text()) == {
        "file_name": "cam04/IMG_0001.JPG",
        "predictions": [{"category_id": 0, "probabilities": [0.6, 0.3, 0.1]}],
    }
    write_lightly_predictions(tmp_path, "empty_or_not", names[:1], probs[:1, :2], ["animal", "empty"])
    assert json.loads((root / "tasks.json").read_text()) == ["species", "empty_or_not"]
    assert not list(root.rglob("*.tmp"))
    with pytest.raises(UserError, match=r"shape \(3, 3\), expected \(2 images, 3 classes\)"):
        write_lightly_predictions(tmp_path, "species", names[:2], probs, LABELS)
    with pytest.raises(UserError, match="same prediction file"):
        write_lightly_predictions(tmp_path, "species", ["a/x.jpg", "a/x.png"], probs[:2], LABELS)


def test_lightly_embeddings_csv_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(4, 5)).astype(np.float32)
    names = ["cam03/IMG_0001.JPG", "cam04/IMG_0001.JPG", "a b,c.jpg", "x.jpg"]
    path = tmp_path / "embeddings.csv"
    write_embeddings_csv(path, names, embeddings)
    header = path.read_text().splitlines()[0]
    assert header == "filenames,embedding_0,embedding_1,embedding_2,embedding_3,embedding_4,labels"
    loaded = read_embeddings_csv(path)
    assert loaded.file_names == names and loaded.labels == [0, 0, 0, 0] and loaded.al_scores is None
    np.testing.assert_array_equal(loaded.embeddings.astype(np.float32), embeddings)

    write_embeddings_csv(
        path, names, embeddings.astype(np.float64), labels=[2, 0, 1, 2], al_scores=[0.5, 0.25, 1.0, 0.0]
    )
    assert path.read_text().splitlines()[0].endswith(",embedding_4,labels,al_score")
    loaded = read_embeddings_csv(path)
    assert loaded.labels == [2, 0, 1, 2]
    np.testing.assert_array_equal(loaded.embeddings, embeddings.astype(np.float64))
    np.testing.assert_array_equal(loaded.al_scores, [0.5, 0.25, 1.0, 0.0])

    path.write_text("filenames,embedding_0,labels\nx.jpg,abc,0\n")
    with pytest.raises(DataError, match=r"line 2: embedding_0: not a number"):
        read_embeddings_csv(path)


def test_an_unreadable_lightly_embeddings_csv_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is a folder, expected a Lightly embeddings.csv"):
        read_embeddings_csv(tmp_path)
    with pytest.raises(DataError, match=r"not found \(.* is a file, not a folder\)"):
        (tmp_path / "file").write_text("x")
        read_embeddings_csv(tmp_path / "file" / "embeddings.csv")
    (tmp_path / "huge.csv").write_text("filenames,embedding_0,labels\n" + "x" * 2000 + ",0.5,0\n", encoding="utf-8")
    limit = csv.field_size_limit(1000)  # the csv module's limit is process-wide: some libraries raise it
    try:
        with pytest.raises(DataError, match=r"not a readable CSV \(field larger than field limit"):
            read_embeddings_csv(tmp_path / "huge.csv")
    finally:
        csv.field_size_limit(limit)


# --- A real Label Studio server -------------------------------------------------------------


IMAGE_PATHS = [
    "cam03/2021/IMG_0001.JPG",
    "cam04/2021/IMG_0001.JPG",
    "cam03/2021/IMG_0002.JPG",
    "cam04/IMG_0003.JPG",
    "cam05/night shot/IMG 0004.JPG",
    "cam05/IMG_0005.JPG",
    "cam05/IMG_0006.JPG",
]
EXTRA_PATH = "cam09/IMG_0009.JPG"  # imported into the project but not requested


def create_user(server: LabelStudioServer, email: str) -> int:
    """Add a user (another annotator) to the organisation."""
    import httpx  # noqa: PLC0415 - httpx is no declared dependency: only the real Label Studio tests need it

    response = httpx.post(
        f"{server.url}/api/users/",
        json={"email": email, "username": email.split("@")[0]},
        headers={"Authorization": f"Token {server.token}"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


@pytest.mark.slow
def test_label_studio_round_trip_with_a_real_server(label_studio_server: LabelStudioServer, tmp_path: Path) -> None:
    import httpx  # noqa: PLC0415 - httpx is no declared dependency: only the real Label Studio tests need it

    server = label_studio_server
    image_root = server.document_root / "images"
    for i, relative in enumerate([*IMAGE_PATHS, EXTRA_PATH]):
        (image_root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), (20 * i, 100, 200 - 20 * i)).save(image_root / relative, "JPEG", quality=80)
    client = LabelStudioClient(server.url, api_key=server.token)
    assert client.user_email == "u@example.com"
    project = client.create_project("camera traps round 1", LABEL_INDEX, image_folder=image_root)
    tasks = build_tasks([*IMAGE_PATHS, EXTRA_PATH], document_root_prefix="images")
    task_ids = client.import_tasks(project, tasks)
    assert len(task_ids) == len(tasks)
    by_path = dict(zip([*IMAGE_PATHS, EXTRA_PATH], task_ids))

    # The image a person sees is the real file, served through local-files storage.
    served = httpx.get(
        server.url + tasks[4]["data"]["image"], headers={"Authorization": f"Token {server.token}"}, timeout=30
    )
    assert served.status_code == 200
    assert served.content == (image_root / IMAGE_PATHS[4]).read_bytes()

    me = 1
    b, c = create_user(server, "b@example.com"), create_user(server, "c@example.com")
    annotate(server, by_path["cam03/2021/IMG_0001.JPG"], me, "deer")
    annotate(server, by_path["cam04/2021/IMG_0001.JPG"], me, "agouti")  # same basename, other folder
    for user, label in ((me, "deer"), (b, "deer"), (c, "agouti")):  # 2-1 majority
        annotate(server, by_path["cam03/2021/IMG_0002.JPG"], user, label)
    annotate(server, by_path["cam04/IMG_0003.JPG"], me, "deer")  # 1-1 tie
    annotate(server, by_path["cam04/IMG_0003.JPG"], b, "agouti")
    annotate(server, by_path["cam05/night shot/IMG 0004.JPG"], b, "bird & co")
    annotate(server, by_path["cam05/IMG_0005.JPG"], me, None)  # skipped by the person
    annotate(server, by_path[EXTRA_PATH], me, "deer")  # cam05/IMG_0006.JPG: never opened

    result = client.read_project_labels(project, LABEL_INDEX, IMAGE_PATHS, document_root_prefix="images")
    source = f"label_studio:{project}"
    assert result.labels == [
        ReceivedLabel("cam03/2021/IMG_0001.JPG", "deer", "u@example.com", source),
        ReceivedLabel("cam04/2021/IMG_0001.JPG", "agouti", "u@example.com", source),
        ReceivedLabel("cam03/2021/IMG_0002.JPG", "deer", "b@example.com,u@example.com", source),
        ReceivedLabel("cam05/night shot/IMG 0004.JPG", "bird & co", "b@example.com", source),
    ]
    assert result.conflicts == {
        "cam03/2021/IMG_0002.JPG": {"agouti": 1, "deer": 2},
        "cam04/IMG_0003.JPG": {"agouti": 1, "deer": 1},
    }
    assert result.skipped == ["cam05/IMG_0005.JPG", "cam05/IMG_0006.JPG"]
    assert result.unknown == {}
    assert result.unmatched == [EXTRA_PATH]

    # The same export saved to a file reads back to the same labels.
    export = tmp_path / "export.json"
    export.write_text(json.dumps(client.export_json_min(project)), encoding="utf-8")
    from_file = read_json_min(export, LABEL_INDEX, IMAGE_PATHS)
    assert from_file.label_by_path() == result.label_by_path()
    assert isinstance(from_file, LabelImport) and from_file.skipped == result.skipped


@pytest.mark.slow
def test_label_studio_refuses_a_wrong_token_in_one_line(label_studio_server: LabelStudioServer) -> None:
    wrong = "0" * 40
    with pytest.raises(UserError) as caught:
        LabelStudioClient(label_studio_server.url, api_key=wrong)
    message = str(caught.value)
    assert label_studio_server.url in message and "API key was refused" in message
    assert wrong not in message and label_studio_server.token not in message and "\n" not in message


def test_json_min_labels_that_are_no_text_are_skipped_saying_why(tmp_path: Path) -> None:
    """A number, true, an object or two choices as a label were "skipped" like a person's skip, without a word."""
    rows = [
        min_row(1, "a/1.jpg", 5),
        min_row(2, "a/2.jpg", True),
        min_row(3, "a/3.jpg", ["deer", "agouti"]),
        min_row(4, "a/4.jpg", {"labels": ["deer"]}),
        min_row(5, "a/5.jpg", None),
        min_row(6, "a/6.jpg", [7]),
        min_row(7, "a/7.jpg", "deer"),
    ]
    requested = [f"a/{i}.jpg" for i in range(1, 9)]
    result = read_json_min(write_json(tmp_path / "export.json", rows), LABEL_INDEX, requested)
    assert [r.path for r in result.labels] == ["a/7.jpg"]
    assert result.skip_reasons == {"a/1.jpg": "not a label: a number", "a/2.jpg": "not a label: true or false",
                                   "a/3.jpg": "several different choices in one annotation", "a/4.jpg": "not a label: an object",
                                   "a/5.jpg": "no choice", "a/6.jpg": "not a label: a number", "a/8.jpg": "not in the export"}
    assert result.skip_lines() == [
        "skipped (not a label: a number): 2 images, e.g. a/1.jpg",
        "skipped (not a label: true or false): 1 images, e.g. a/2.jpg",
        "skipped (several different choices in one annotation): 1 images, e.g. a/3.jpg",
        "skipped (not a label: an object): 1 images, e.g. a/4.jpg",
        "skipped (no choice): 1 images, e.g. a/5.jpg",
        "skipped (not in the export): 1 images, e.g. a/8.jpg",
    ]


def test_a_huge_label_is_never_echoed_whole(tmp_path: Path) -> None:
    """A 5 MB label (unknown, or matched ignoring case) and a huge path: every line a person reads stays short."""
    huge = "x" * 5_000_000
    rows = [min_row(1, "a/1.jpg", huge), min_row(2, "a/2.jpg", " DEER" + " " * 5_000_000), min_row(3, "a/3.jpg", "deer", 1),
            min_row(3, "a/3.jpg", huge, 2)]
    result = read_json_min(write_json(tmp_path / "export.json", rows), LABEL_INDEX, ["a/1.jpg", "a/2.jpg", "a/3.jpg"])
    assert result.unknown == {"a/1.jpg": huge} and result.renamed  # the values kept whole; only what is shown is cut
    lines = [result.summary(), *result.detail_lines()]
    assert len(lines) == 3 and all(len(line) < 1000 for line in lines), [len(line) for line in lines]
    assert "(5000002 characters)" in lines[1]


def test_timelapse_skips_say_why(tmp_path: Path) -> None:
    export = tmp_path / "export.csv"
    export.write_text("File,RelativePath,Species,DeleteFlag\na.jpg,cam,,false\nb.jpg,cam,deer,true\nc.jpg,cam,deer,false\n")
    result = read_timelapse_export(export, LABEL_INDEX, ["cam/a.jpg", "cam/b.jpg", "cam/c.jpg", "cam/d.jpg"])
    assert result.skip_reasons == {"cam/a.jpg": "no Species", "cam/b.jpg": "DeleteFlag set", "cam/d.jpg": "not in the export"}
