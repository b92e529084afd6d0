"""Cropping as shards on Dask (issue 10): the same manifest and crops as one process; a killed worker costs its shard only."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import classification.shards as shards_module
from classification.data.crop_options import CropOptions
from classification.data.crop_run import CropReport, crop_detections
from classification.errors import UserError
from classification.shards import SHARDS_DIR, DaskOptions, cut_shards, read_shard, write_shard
from tests.helpers.processes import run_entry_point

dask = pytest.importorskip("dask", reason="the dask extra is not installed (pip install -e '.[dask]')")
distributed = pytest.importorskip("distributed", reason="the dask extra is not installed (pip install -e '.[dask]')")

N_IMAGES = 36
SLOW_SAVE_S = 0.1  # per crop in the fault test's workers, so that a shard is mid-way when its worker is killed


def mct_subset(shared_data: Path, tmp_path: Path, n_images: int = N_IMAGES) -> Path:
    """A CCT with every boxed annotation of the first ``n_images`` MCT images that have boxes."""
    cct = json.loads((shared_data / "mct" / "mct_cct.json").read_text())
    boxed = [a for a in cct["annotations"] if a.get("bbox")]
    image_ids = list(dict.fromkeys(a["image_id"] for a in boxed))[:n_images]
    keep = set(image_ids)
    subset = {**cct, "images": [im for im in cct["images"] if im["id"] in keep],
              "annotations": [a for a in boxed if a["image_id"] in keep]}
    path = tmp_path / "mct_subset.json"
    path.write_text(json.dumps(subset), encoding="utf-8")
    return path


def run(input_json: Path, crops_dir: Path, images_dir: Path, **options: Any) -> CropReport:
    """``crop_detections`` with the progress bar off."""
    return crop_detections(input_json, crops_dir, images_dir, CropOptions(progress=False, **options))


def crop_bytes(crops_dir: Path) -> dict[str, bytes]:
    """Every crop file's bytes by its path relative to ``crops_dir``."""
    return {p.relative_to(crops_dir).as_posix(): p.read_bytes() for p in crops_dir.rglob("*.jpg")}


def crop_identities(crops_dir: Path) -> dict[str, tuple[int, int]]:
    """Every crop file's (inode, mtime in ns): unchanged when a re-run leaves the file alone."""
    return {p.relative_to(crops_dir).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in crops_dir.rglob("*.jpg")}


def test_cut_shards_fixed_size_named_by_their_jobs(tmp_path: Path) -> None:
    jobs = list(range(10))
    shards = cut_shards(jobs, 4, tmp_path, lambda piece: json.dumps(list(piece)))
    assert [list(s.jobs) for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    again = cut_shards(jobs, 4, tmp_path, lambda piece: json.dumps(list(piece)))
    assert [s.path for s in again] == [s.path for s in shards], "the same jobs name the same files"
    other = cut_shards([0, 1, 2, 3, 99], 4, tmp_path, lambda piece: json.dumps(list(piece)))
    assert other[0].path == shards[0].path and other[1].path not in {s.path for s in shards}
    write_shard(shards[0].path, ["done"])
    assert read_shard(shards[0].path) == ["done"] and read_shard(shards[1].path) is None
    shards[1].path.write_bytes(b"\x80\x05truncated")
    assert read_shard(shards[1].path) is None, "an unreadable shard file is redone, not trusted"


def test_bad_dask_flags_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for options, message in [(DaskOptions(workers=0), "--dask-workers must be at least 1"),
                             (DaskOptions(workers=2, scheduler="tcp://127.0.0.1:1"), "not both"),
                             (DaskOptions(workers=2, shard_size=0), "--shard-size must be at least 1")]:
        with pytest.raises(UserError, match=message):
            options.validate()
    monkeypatch.setattr(shards_module, "CONNECT_TIMEOUT_S", 1)
    with pytest.raises(UserError, match="--scheduler tcp://127.0.0.1:1: cannot connect"):
        with shards_module.dask_client(DaskOptions(scheduler="tcp://127.0.0.1:1")):
            pass


@pytest.mark.slow
def test_two_worker_local_cluster_writes_what_one_process_writes(shared_data: Path, tmp_path: Path) -> None:
    cct_path = mct_subset(shared_data, tmp_path)
    images = shared_data / "mct" / "images"
    one = run(cct_path, tmp_path / "one", images, crop_strategy="pad")
    result = run_entry_point("utils/crop_detections.py", cct_path, tmp_path / "dask", "--images-dir", images,
                             "--crop-strategy", "pad", "--dask-workers", "2", "--shard-size", "5")
    assert result.returncode == 0, result.stderr
    assert f"{one.new} new, 0 skipped" in result.stdout and one.new >= N_IMAGES
    assert (tmp_path / "dask" / "crops_manifest.csv").read_bytes() == (tmp_path / "one" / "crops_manifest.csv").read_bytes()
    assert crop_bytes(tmp_path / "dask") == crop_bytes(tmp_path / "one")
    assert not (tmp_path / "dask" / SHARDS_DIR).exists(), "shard files are removed once the manifest lists their crops"


def slow_down_saves(seconds: float) -> None:
    """Run in each worker (``Client.run``): every crop takes ``seconds`` longer to save."""
    import classification.data.crop_image as crop_image  # noqa: PLC0415 - the worker's own copy of the module

    save = crop_image.save_jpeg

    def slow_save(*args: Any, **kwargs: Any) -> None:
        time.sleep(seconds)
        save(*args, **kwargs)

    crop_image.save_jpeg = slow_save


@pytest.fixture
def local_cluster(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Two worker processes (one thread each, one task at a time) whose tasks are retried ``request.param`` times
    (default 0) when their worker dies."""
    retries = getattr(request, "param", 0)
    settings = {"distributed.scheduler.allowed-failures": retries, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(settings), distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
            silence_logs=logging.ERROR) as cluster, distributed.Client(cluster) as client:
        yield client


def kill_a_worker_when(client: Any, crops_dir: Path, n_crops: int) -> threading.Thread:
    """In the background: once ``n_crops`` crops exist, SIGKILL one worker process of the cluster."""
    pids = list(client.run(os.getpid).values())

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(crops_dir.rglob("*.jpg"))) < n_crops:
            time.sleep(0.01)
        os.kill(pids[0], signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_killed_worker_costs_only_its_shard(shared_data: Path, tmp_path: Path, local_cluster: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    cct_path = mct_subset(shared_data, tmp_path)
    images, crops_dir = shared_data / "mct" / "images", tmp_path / "dask"
    reference = run(cct_path, tmp_path / "one", images)
    options = {"dask": DaskOptions(scheduler=local_cluster.scheduler.address, shard_size=6)}
    local_cluster.run(slow_down_saves, SLOW_SAVE_S)
    # 2 workers, 6 crops a shard: at 18 crops each worker is half-way through its second shard
    watcher = kill_a_worker_when(local_cluster, crops_dir, n_crops=18)
    with pytest.raises(UserError, match=r"[12] of 6 shards failed \(KilledWorker.*run the same command again") as failure:
        run(cct_path, crops_dir, images, **options)
    watcher.join()
    n_failed = int(str(failure.value).split()[0])  # 2 when a shard waiting on the killed worker was failed with it
    before = crop_identities(crops_dir)
    finished: list[Any] = [read_shard(p) for p in (crops_dir / SHARDS_DIR).glob("shard-*.pkl")]
    in_finished_shards = {r.crop_path for outcomes in finished for o in outcomes for r in o.records}
    assert len(finished) == 6 - n_failed and not (crops_dir / "crops_manifest.csv").exists()
    assert set(before) - in_finished_shards, "the killed shard had made some of its crops"
    assert len(before) < reference.new, "and not all of them"
    caplog.set_level(logging.INFO, logger="classification.shards")
    again = run(cct_path, crops_dir, images, **options)
    assert f"reusing {6 - n_failed} of 6 shards" in caplog.text
    assert (again.new, again.skipped, again.redone) == (reference.new - len(before), len(before), 0)
    after = crop_identities(crops_dir)
    assert {name: after[name] for name in before} == before, "no finished crop was written again"
    assert (crops_dir / "crops_manifest.csv").read_bytes() == (tmp_path / "one" / "crops_manifest.csv").read_bytes()
    assert crop_bytes(crops_dir) == crop_bytes(tmp_path / "one")


@pytest.mark.slow
@pytest.mark.parametrize("local_cluster", [3], indirect=True)
def test_shard_of_a_killed_worker_is_retried_and_keeps_its_crops(shared_data: Path, tmp_path: Path, local_cluster: Any) -> None:
    # Dask's default: a task whose worker died runs again elsewhere; the crops the dead worker made are checked, not redone.
    cct_path = mct_subset(shared_data, tmp_path)
    images, crops_dir = shared_data / "mct" / "images", tmp_path / "dask"
    reference = run(cct_path, tmp_path / "one", images)
    local_cluster.run(slow_down_saves, SLOW_SAVE_S)
    watcher = kill_a_worker_when(local_cluster, crops_dir, n_crops=18)
    report = run(cct_path, crops_dir, images, dask=DaskOptions(scheduler=local_cluster.scheduler.address, shard_size=6))
    watcher.join()
    assert report.new + report.skipped == reference.new and report.skipped > 0 and report.redone == 0
    assert (crops_dir / "crops_manifest.csv").read_bytes() == (tmp_path / "one" / "crops_manifest.csv").read_bytes()
    assert crop_bytes(crops_dir) == crop_bytes(tmp_path / "one")
