"""Prediction and embedding as shards on Dask (issue 10): the same predictions.csv, MegaDetector file and embeddings as one process."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from classification.active_learning.embeddings import backbone_config, embed_folder
from classification.config import load_config
from classification.errors import UserError
from classification.evaluation.predict import run_prediction
from classification.shards import SHARDS_DIR, DaskOptions
from tests.helpers.demo import TrainedRun, run_predict, split_paths
from tests.helpers.processes import run_in_process

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed (pip install -e '.[dask]')")
pytestmark = pytest.mark.slow  # trains a tiny model once (~10 s); each cluster's workers import torch


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """The address of a local cluster of two single-threaded worker processes, for the whole module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster:
        yield cluster.scheduler_address


def same_files(first: Path, second: Path, names: list[str]) -> None:
    """``names`` exist in both folders with the same bytes."""
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def image_folder(run: TrainedRun, folder: Path) -> Path:
    """The test crops in one folder, plus a file that is not an image (skipped by both runs)."""
    folder.mkdir()
    for i, path in enumerate(split_paths(run.data.dataset_dir, "test")):
        shutil.copy(run.data.crops_dir / path, folder / f"{i:02d}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def test_split_predictions_on_two_workers_equal_one_process(trained: TrainedRun, tmp_path: Path) -> None:
    one = run_prediction(trained.config, "last", split="test", output_dir=tmp_path / "one", batch_size=4)
    result = run_predict("--config", trained.config, "--checkpoint", "last", "--split", "test", "--output-dir", tmp_path / "dask",
                         "--batch-size", "4", "--dask-workers", "2", "--shard-size", "6")
    assert result.returncode == 0, result.stderr
    assert len(one.predictions) > 8, "several shards of 8 (6 rounded up to whole batches of 4)"
    same_files(tmp_path / "one", tmp_path / "dask", ["predictions.csv", "skipped.csv"])
    one_metrics, dask_metrics = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "dask"))
    one_metrics.pop("prediction"), dask_metrics.pop("prediction")  # where and how fast: differs by nature
    assert one_metrics == dask_metrics
    assert not (tmp_path / "dask" / SHARDS_DIR).exists(), "shard files are removed once predictions.csv holds their rows"
    info = json.loads((tmp_path / "dask" / "prediction_info.json").read_text())
    assert info["device"] == "Dask workers (device: auto)"  # the client chose no device (on a GPU machine: took no GPU)


def test_folder_and_megadetector_predictions_on_a_cluster_equal_one_process(trained: TrainedRun, shared_data: Path,
                                                                           tmp_path: Path, scheduler: str) -> None:
    folder = image_folder(trained, tmp_path / "images")
    dask = DaskOptions(scheduler=scheduler, shard_size=5)
    one = run_prediction(trained.config, "last", images_dir=folder, output_dir=tmp_path / "one", batch_size=4)
    sharded = run_prediction(trained.config, "last", images_dir=folder, output_dir=tmp_path / "dask", batch_size=4, dask=dask)
    assert one.skipped == sharded.skipped == ["broken.jpg"]
    same_files(tmp_path / "one", tmp_path / "dask", ["predictions.csv", "skipped.csv"])

    root, crops = shared_data / "lila_md_test", tmp_path / "md_crops"
    cropped = run_in_process("utils/crop_detections.py", root / "md_v5a_output.json", crops, "--images-dir", root / "images",
                             "--max-size", "64")
    assert cropped.returncode == 0, cropped.stderr
    for name, options in (("md_one", DaskOptions()), ("md_dask", dask)):
        run_prediction(trained.config, "last", megadetector=root / "md_v5a_output.json", crops_dir=crops,
                       output_dir=tmp_path / name, topk=2, batch_size=4, dask=options)
    same_files(tmp_path / "md_one", tmp_path / "md_dask", ["predictions.csv", "md_v5a_output_classified.json"])


def test_embeddings_on_a_cluster_equal_one_process(trained: TrainedRun, tmp_path: Path, scheduler: str) -> None:
    folder = image_folder(trained, tmp_path / "images")
    config = load_config(trained.config).model_copy(update={"batch_size": 4, "num_workers": 0, "device": "cpu"})
    outputs = ["embeddings.npy", "probabilities.npy", "files.csv", "embeddings.csv", "skipped.csv"]
    one = embed_folder(folder, tmp_path / "one", config, trained.run_dir, "last", chunk_size=6)
    dask = DaskOptions(scheduler=scheduler)
    sharded = embed_folder(folder, tmp_path / "dask", config, trained.run_dir, "last", chunk_size=6, dask=dask)
    assert (one.embedded, one.skipped) == (sharded.embedded, sharded.skipped) and one.skipped == 1
    same_files(tmp_path / "one", tmp_path / "dask", outputs)
    shards = {path: path.stat().st_mtime_ns for path in (tmp_path / "dask" / "chunks" / "shards").glob("shard-*.pkl")}
    assert len(shards) > 1, "one shard per chunk, kept (as the chunks are) for a re-run"
    again = embed_folder(folder, tmp_path / "dask", config, trained.run_dir, "last", chunk_size=6, dask=dask)
    assert again.embedded == one.embedded
    assert {path: path.stat().st_mtime_ns for path in shards} == shards, "reused, not made again"
    same_files(tmp_path / "one", tmp_path / "dask", outputs)
    lost = sorted(shards)[1]  # as if its worker had been killed: only that shard is computed again
    lost.unlink()
    embed_folder(folder, tmp_path / "dask", config, trained.run_dir, "last", chunk_size=6, dask=dask)
    assert lost.is_file() and {path: path.stat().st_mtime_ns for path in shards if path != lost} == {
        path: mtime for path, mtime in shards.items() if path != lost}
    same_files(tmp_path / "one", tmp_path / "dask", outputs)


def test_a_random_backbone_on_dask_equals_one_process(trained: TrainedRun, tmp_path: Path, scheduler: str) -> None:
    """Random weights are drawn from the config's seed, so every worker builds the same network (this was refused:
    each worker drew its own)."""
    folder = image_folder(trained, tmp_path / "images")
    config = backbone_config("resnet18", 32, 4, 0, "cpu", pretrained=False)
    embed_folder(folder, tmp_path / "one", config, chunk_size=6)
    embed_folder(folder, tmp_path / "dask", config, chunk_size=6, dask=DaskOptions(scheduler=scheduler))
    same_files(tmp_path / "one", tmp_path / "dask", ["embeddings.npy", "files.csv", "skipped.csv"])


@pytest.mark.parametrize(("dask", "message"), [(DaskOptions(workers=0), "--dask-workers must be at least 1"),
                                                (DaskOptions(workers=2, scheduler="tcp://127.0.0.1:1"), "not both")])
def test_embedding_refuses_dask_flags_that_contradict(tmp_path: Path, dask: DaskOptions, message: str) -> None:
    """As predict.py and crop_detections.py do: --dask-workers 0, or a local cluster and a scheduler at once, is one line
    (embedding used to run in one process for the first and ignore --dask-workers for the second)."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (90, 120, 60)).save(tmp_path / "images" / "a.jpg")
    config = backbone_config("resnet18", 32, 4, 0, "cpu", pretrained=False)
    with pytest.raises(UserError, match=message):
        embed_folder(tmp_path / "images", tmp_path / "out", config, dask=dask)
