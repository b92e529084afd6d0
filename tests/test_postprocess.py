"""After prediction (issue 11 §1-3): sequence smoothing, calibration, abstention, taxonomy, species lists, MegaDetector.

The grouping runs on the real MCT metadata (sequences, stations, times) and the detector
combination on real MegaDetector v5a output; the class probabilities are simulated where a
trained model would cost minutes (the end-to-end case through predict.py trains a tiny one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import classification.evaluation.predict as predict_module
from classification.config import ExperimentConfig, PostprocessConfig, config_hash, load_config
from classification.data.cct import load_cct
from classification.data.crop_options import CropOptions
from classification.data.crop_run import crop_detections
from classification.data.dataset import crops_frame_from_cct
from classification.errors import DataError
from classification.evaluation import calibration as cal
from classification.evaluation.postprocess import PostprocessInput, run_postprocess
from classification.evaluation.postprocess_steps import (
    group_mean,
    group_vote,
    prediction_context,
    probabilities_from_topk,
    sequence_keys,
    smooth_images,
)
from classification.evaluation.report import prediction_columns
from classification.evaluation.taxonomy import (
    allowed_matrix,
    megadetector_descriptions,
    rank_accuracy,
    read_species_list,
    read_taxonomy,
    roll_up,
)
from tests.helpers.demo import TrainedRun, predict_here
from tests.helpers.notebooks import cell, outputs_text, run_notebook
from tests.helpers.processes import REPO_ROOT, SHARED_DATA

MCT_TAXONOMY = REPO_ROOT / "runs" / "efficientnet-lite0" / "mct" / "taxonomy.csv"


# ---------------------------------------------------------------- helpers


def mct_crops(shared_data: Path) -> pd.DataFrame:
    """The MCT boxes as crops-manifest rows (no cropping needed: the metadata is what is grouped)."""
    data = load_cct(shared_data / "mct" / "mct_cct.json")
    frame = crops_frame_from_cct(data, Path("crops"), "mct")
    frame["location"] = frame["location"].fillna("").astype(str)
    return frame


def label_names_of(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["label"].unique())


def noisy_probabilities(targets: np.ndarray, num_classes: int, seed: int, signal: float = 1.2, sharpness: float = 1.0) -> np.ndarray:
    """A simulated classifier: the true class's logit raised by ``signal``, independent noise per crop."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(targets), num_classes))
    logits[np.arange(len(targets)), targets] += signal
    logits *= sharpness
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def predictions_frame(crops: pd.DataFrame, probabilities: np.ndarray, label_names: list[str], topk: int | None = None) -> pd.DataFrame:
    """A predictions.csv table for ``crops`` with these probabilities (top-k = every class unless given)."""
    k = topk or len(label_names)
    order = np.argsort(-probabilities, axis=1)[:, :k]
    names = np.asarray(label_names, dtype=object)
    table = {"path": crops["crop_path"].to_numpy(), "dataset": crops["dataset"].to_numpy(), "location": crops["location"].to_numpy(),
             "true_label": crops["label"].to_numpy(), "true_prob": np.nan, "pred_label": names[order[:, 0]],
             "confidence": probabilities.max(axis=1)}
    for j in range(k):
        table[f"top{j + 1}_label"] = names[order[:, j]]
    for j in range(k):
        table[f"top{j + 1}_prob"] = np.take_along_axis(probabilities, order[:, j:j + 1], axis=1)[:, 0]
    return pd.DataFrame(table, columns=prediction_columns(k))


def targets_of(crops: pd.DataFrame, label_names: list[str]) -> np.ndarray:
    return np.array([label_names.index(n) for n in crops["label"]], dtype=np.int64)


def fake_checkpoint(run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


# ---------------------------------------------------------------- config


def test_postprocess_section_defaults_off_typos_and_resume(tmp_path: Path) -> None:
    assert ExperimentConfig(data_root=tmp_path).postprocess == PostprocessConfig()
    config = tmp_path / "config.yml"
    config.write_text("data_root: .\npostprocess:\n  sequence: mean\n  taxonomy: taxonomy.csv\n")
    loaded = load_config(config)
    assert loaded.postprocess.sequence == "mean" and loaded.postprocess.taxonomy == (tmp_path / "taxonomy.csv").resolve()
    config.write_text("data_root: .\npostprocess:\n  sequense: mean\n")
    with pytest.raises(DataError, match=r"postprocess.sequense: unknown key \(did you mean sequence\?\)"):
        load_config(config)
    config.write_text("data_root: .\npostprocess:\n  species_list: s.csv\n  species_list_action: rollup\n")
    with pytest.raises(DataError, match="rollup needs postprocess.taxonomy"):
        load_config(config)
    # changing the post-processing never blocks resuming a training run
    plain = ExperimentConfig(data_root=tmp_path)
    assert config_hash(plain) == config_hash(plain.model_copy(update={"postprocess": PostprocessConfig(sequence="vote")}))


# ---------------------------------------------------------------- sequences on MCT


def test_sequence_averaging_on_mct_raises_top1(shared_data: Path) -> None:
    crops = mct_crops(shared_data)
    names = label_names_of(crops)
    targets = targets_of(crops, names)
    raw = noisy_probabilities(targets, len(names), seed=0)
    predictions = predictions_frame(crops, raw, names)
    context = prediction_context(predictions, crops)
    keys = sequence_keys(predictions, context, 60.0)
    assert len(set(keys)) == crops["seq_id"].nunique() == 100  # MCT: 100 sequences, every crop in one
    averaged = group_mean(raw, keys, np.ones(len(keys)))
    raw_top1, seq_top1 = (raw.argmax(1) == targets).mean(), (averaged.argmax(1) == targets).mean()
    assert seq_top1 > raw_top1 + 0.2, (raw_top1, seq_top1)
    # within a sequence every crop now gives the same answer
    assert pd.DataFrame({"k": keys, "p": averaged.argmax(1)}).groupby("k")["p"].nunique().max() == 1


def test_without_seq_id_location_and_time_window_recover_mct_sequences(shared_data: Path) -> None:
    crops = mct_crops(shared_data)
    crops = crops[crops["location"] != ""].reset_index(drop=True)
    names = label_names_of(crops)
    predictions = predictions_frame(crops, noisy_probabilities(targets_of(crops, names), len(names), 1), names)
    context = prediction_context(predictions, crops.assign(seq_id=""))
    keys = sequence_keys(predictions, context, 60.0)
    timed = (crops["datetime"] != "").to_numpy()
    assert all(k.startswith("time:") for k in keys[timed]) and all(k.startswith("row:") for k in keys[~timed])  # 11 frames lack a time
    keys, crops = keys[timed], crops[timed]
    # nearly every window is one real sequence (two pairs of back-to-back sequences, 4 s apart, merge: same species),
    # no window mixes species, and nearly every sequence is one window
    pairs = pd.DataFrame({"window": keys, "seq": crops["seq_id"].to_numpy(), "label": crops["label"].to_numpy()})
    assert (pairs.groupby("window")["seq"].nunique() > 1).mean() < 0.05
    assert pairs.groupby("window")["label"].nunique().max() == 1
    assert pairs.groupby("seq")["window"].nunique().mean() < 1.1


def test_time_windows_read_exif_style_datetimes() -> None:
    """CCT datetimes written the EXIF way (``2011:06:13 08:15:00``, which the time splits read too) keep their date:
    pandas alone read them as 0001-01-01 at that time of day, so frames of one camera days apart, at the same hour,
    were averaged as one sequence."""
    times = ["2011:06:13 08:15:00", "2011:06:13 08:15:20", "2011:06:14 08:15:10", "2011-06-15 08:15:00"]
    predictions = pd.DataFrame({"path": [f"{i}.jpg" for i in range(4)], "dataset": "d", "location": "cam1"})
    context = pd.DataFrame({"image": predictions["path"], "seq_id": "", "datetime": times, "detection_conf": np.nan})
    keys = sequence_keys(predictions, context, 60.0)
    assert keys[0] == keys[1] and len(set(keys)) == 3, keys


def test_image_smoothing_gives_unconfident_minority_detections_the_dominant_class() -> None:
    cow, deer = [0.9, 0.1], [0.3, 0.7]
    probabilities = np.array([cow, cow, cow, deer, [0.02, 0.98], [0.2, 0.8]])
    images = np.array(["a", "a", "a", "a", "a", "b"])
    smoothed, changed = smooth_images(probabilities, images, confident=0.9)
    assert changed == 1  # the unconfident deer; the confident one (0.98) stays a deer; image b is alone
    assert smoothed.argmax(1).tolist() == [0, 0, 0, 0, 1, 1]


def test_vote_and_detection_weights() -> None:
    probabilities = np.array([[0.6, 0.4], [0.55, 0.45], [0.0, 1.0], [0.7, 0.3]])
    keys = np.array(["s", "s", "s", "t"])
    voted = group_vote(probabilities, keys, np.ones(4))
    assert voted.argmax(1).tolist() == [0, 0, 0, 0] and voted[0, 0] == pytest.approx(2 / 3, abs=1e-5)  # 2 votes of 3
    assert group_mean(probabilities, keys, np.ones(4)).argmax(1).tolist() == [1, 1, 1, 0]  # the sure one outweighs two unsure
    weighted = group_mean(probabilities, keys, np.array([0.9, 0.9, 0.1, 1.0]))  # ... unless the detector barely saw it
    assert weighted.argmax(1).tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------- calibration and abstention


def test_temperature_lowers_nll_and_ece_on_val_and_keeps_top1(shared_data: Path) -> None:
    crops = mct_crops(shared_data)
    names = label_names_of(crops)
    targets = targets_of(crops, names)
    overconfident = noisy_probabilities(targets, len(names), seed=2, signal=1.5, sharpness=3.0)
    temperature = cal.fit_temperature(overconfident, targets)
    calibrated = cal.apply_temperature(overconfident, temperature)
    before, after = cal.calibration_figures(overconfident, targets, names), cal.calibration_figures(calibrated, targets, names)
    assert temperature > 1.5
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] / 2, (before, after)
    assert (calibrated.argmax(1) == overconfident.argmax(1)).all()


def test_thresholds_reach_the_target_precision_on_val(shared_data: Path) -> None:
    crops = mct_crops(shared_data)
    names = label_names_of(crops)
    targets = targets_of(crops, names)
    probabilities = noisy_probabilities(targets, len(names), seed=3, signal=2.0, sharpness=1.5)
    thresholds, pooled = cal.fit_thresholds(probabilities, targets, 0.9)
    predicted, confidence = probabilities.argmax(1), probabilities.max(1)
    answered = confidence >= thresholds[predicted]
    assert 0 < answered.mean() < 1
    for c in range(len(names)):
        mine = answered & (predicted == c)
        if np.isfinite(thresholds[c]) and (predicted == c).sum() >= cal.MIN_SUPPORT:
            assert (predicted[mine] == targets[mine]).mean() >= 0.9
    assert (predicted[answered] == targets[answered]).mean() >= 0.9
    coverage, accuracy = cal.risk_coverage(confidence, predicted == targets)
    assert coverage[-1] == 1.0 and accuracy[0] >= accuracy[-1]


def test_fit_on_val_then_apply_to_test_and_refuse_a_changed_checkpoint(shared_data: Path, tmp_path: Path) -> None:
    crops = mct_crops(shared_data)
    names = label_names_of(crops)
    targets = targets_of(crops, names)
    predictions = predictions_frame(crops, noisy_probabilities(targets, len(names), 4, 1.5, 3.0), names)
    checkpoint = fake_checkpoint(tmp_path / "run")
    config = PostprocessConfig(calibrate=True, abstain=True, sequence="mean", target_precision=0.95)
    probabilities = probabilities_from_topk(predictions, names)
    val = run_postprocess(config, names, predictions, probabilities, tmp_path / "val",
                          PostprocessInput(tmp_path / "run", checkpoint, fit=True, manifest=crops))
    assert val is not None and val.metrics is not None
    saved = json.loads((tmp_path / "run" / "postprocess" / "best.json").read_text())
    assert val.fitted is not None and saved["temperature"] == pytest.approx(val.fitted.temperature) and saved["target_precision"] == 0.95
    assert val.metrics["answers"]["species_accuracy"] >= 0.95 and val.metrics["answers"]["species_coverage"] < 1
    stages = val.metrics["stages"]
    assert list(stages) == ["raw", "calibrated", "sequence"]
    assert stages["calibrated"]["ece"] < stages["raw"]["ece"] and stages["sequence"]["top1"] > stages["raw"]["top1"]
    assert (tmp_path / "val" / "risk_coverage.png").stat().st_size > 0
    table = pd.read_csv(tmp_path / "val" / "postprocessed.csv", keep_default_na=False)
    assert set(table["answer"]) - set(names) == {"unknown"}

    again = run_postprocess(config, names, predictions, probabilities, tmp_path / "test",
                            PostprocessInput(tmp_path / "run", checkpoint, fit=False, manifest=crops))
    assert again is not None and again.metrics is not None
    assert again.fitted is not None and again.metrics["skipped"] is None
    checkpoint.write_bytes(b"another best.pt")
    stale = run_postprocess(config, names, predictions, probabilities, tmp_path / "test2",
                            PostprocessInput(tmp_path / "run", checkpoint, fit=False, manifest=crops))
    assert stale is not None and stale.metrics is not None
    assert stale.fitted is None and "fitted for another best.pt" in stale.metrics["skipped"]
    assert list(stale.metrics["stages"]) == ["raw", "sequence"]  # the unfitted steps are left out, and said so


# ---------------------------------------------------------------- taxonomy and species lists


def test_taxonomy_rolls_unsure_deer_up_to_cervidae_and_scores_every_rank() -> None:
    names = sorted(pd.read_csv(MCT_TAXONOMY)["label"])
    taxonomy = read_taxonomy(MCT_TAXONOMY, names)
    deer = [names.index(n) for n in ("red_deer", "roe_deer", "red_brocket_deer", "white_tailed_deer")]
    p = np.full((3, len(names)), 0.01)
    p[0, deer] = 0.22  # no deer is sure, together they are
    p[1, names.index("agouti")], p[1, names.index("coiban_agouti")] = 0.5, 0.45  # genus dasyprocta
    p[2, :] = 1.0  # nothing stands out at any rank
    p /= p.sum(axis=1, keepdims=True)
    answer, rank, value = roll_up(p, taxonomy, np.ones(3, dtype=bool), 0.8, "unknown")
    assert answer.tolist() == ["cervidae", "dasyprocta", "mammalia"] and rank.tolist() == ["family", "genus", "class"]
    assert value[0] == pytest.approx(p[0, deer].sum())
    accuracy = rank_accuracy(np.array([names.index("red_deer")]), np.array([names.index("roe_deer")]), taxonomy)
    assert accuracy["species"]["top1"] == 0 and accuracy["genus"]["top1"] == 0 and accuracy["family"]["top1"] == 1
    descriptions = megadetector_descriptions([*names, "cervidae", "unknown"], taxonomy)
    assert descriptions[str(names.index("red_deer"))].split(";")[1:] == ["mammalia", "artiodactyla", "cervidae", "cervus",
                                                                         "elaphus", "red deer"]
    assert descriptions[str(len(names))].split(";")[1:] == ["mammalia", "artiodactyla", "cervidae", "", "", "cervidae"]


def test_taxonomy_and_species_list_errors_are_one_line(tmp_path: Path) -> None:
    names = ["a", "b"]
    bad = tmp_path / "taxonomy.csv"
    bad.write_text("label,genus,family,order,class\na,g,f1,o,c\nb,g,f2,o,c\n")
    with pytest.raises(DataError, match="genus 'g' sits under more than one family"):
        read_taxonomy(bad, names)
    bad.write_text("label,genus,family,order,class\na,g,f,o,c\n")
    with pytest.raises(DataError, match="no row for the model's classes b"):
        read_taxonomy(bad, names)
    species = tmp_path / "species.csv"
    species.write_text("location,label,status\n,zebra,allow\n")
    with pytest.raises(DataError, match="line 2: label 'zebra' is not a model class"):
        read_species_list(species, names, None)
    species.write_text("location,label,status\n,a,maybe\n")
    with pytest.raises(DataError, match="status 'maybe'"):
        read_species_list(species, names, None)


def test_species_list_renormalises_or_rolls_up_and_reports_it(shared_data: Path, tmp_path: Path) -> None:
    crops = mct_crops(shared_data)
    names = label_names_of(crops)
    targets = targets_of(crops, names)
    station = crops["location"][crops["label"] == "ocelot"].iloc[0]
    species = tmp_path / "species.csv"
    # each station allows the species recorded there (what a project knows of its sites); one more blocks a deer
    stations = crops[crops["location"] != ""].groupby("location")["label"].unique()
    lines = ["location,label,status", "elsewhere,red_deer,block"]
    lines += [f"{location},{label},allow" for location, labels in stations.items() for label in sorted(labels)]
    species.write_text("\n".join(lines) + "\n")
    species_list = read_species_list(species, names, None)
    allowed = allowed_matrix(species_list, [station, "elsewhere"], len(names))
    assert allowed[0].sum() == len(stations[station]) and allowed[0, names.index("ocelot")]
    assert not allowed[1, names.index("red_deer")] and allowed[1].sum() == len(names) - 1

    predictions = predictions_frame(crops, noisy_probabilities(targets, len(names), 5), names)
    where = PostprocessInput(tmp_path / "run", fake_checkpoint(tmp_path / "run"), fit=False, manifest=crops)
    result = run_postprocess(PostprocessConfig(species_list=species), names, predictions,
                             probabilities_from_topk(predictions, names), tmp_path / "out", where)
    assert result is not None and result.metrics is not None
    note = result.metrics["notes"]["species_list"]
    changed = result.table["species_list"] == "renormalised"
    assert note["n_disallowed"] == changed.sum() > 0
    located = result.table[result.table["location"] != ""]
    assert all(label in stations[location] for label, location in zip(located["pred_label"], located["location"]))
    assert result.metrics["stages"]["species_list"]["top1"] > result.metrics["stages"]["raw"]["top1"]

    rolled = run_postprocess(PostprocessConfig(species_list=species, species_list_action="rollup", taxonomy=MCT_TAXONOMY),
                             names, predictions, probabilities_from_topk(predictions, names), tmp_path / "out2", where)
    assert rolled is not None
    flagged = rolled.table["species_list"] == "rolled up"
    assert flagged.sum() == note["n_disallowed"] and (rolled.table.loc[flagged, "answer_rank"] != "species").all()


# ---------------------------------------------------------------- MegaDetector + classifier


@pytest.fixture(scope="module")
def md_crops(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    source = SHARED_DATA / "lila_md_test"
    if not source.is_dir():
        pytest.skip(f"real data not found at {source}")
    crops = tmp_path_factory.mktemp("md") / "crops"
    crop_detections(source / "md_v5a_output.json", crops, source / "images",
                    CropOptions(threshold=0.2, max_size=48, progress=False))
    return source / "md_v5a_output.json", crops


def test_detector_and_classifier_blank_species_and_unknown_on_real_megadetector_output(md_crops: tuple[Path, Path],
                                                                                       tmp_path: Path) -> None:
    md_path, crops = md_crops
    manifest = pd.read_csv(crops / "crops_manifest.csv", dtype=str, keep_default_na=False)
    names = sorted(pd.read_csv(MCT_TAXONOMY)["label"])
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.full(len(names), 0.3), size=len(manifest))
    probabilities[0] = 0.0
    probabilities[0, names.index("ocelot")] = 1.0  # one crop the classifier is sure of
    table = predictions_frame(manifest.assign(label=""), probabilities, names, topk=3)
    config = PostprocessConfig(taxonomy=MCT_TAXONOMY, rollup_threshold=0.6, blank_threshold=0.2)
    where = PostprocessInput(tmp_path / "run", fake_checkpoint(tmp_path / "run"), fit=False, manifest=manifest,
                             megadetector=md_path, classifier="test")
    result = run_postprocess(config, names, table, probabilities_from_topk(table, names), tmp_path / "out", where)
    assert result is not None
    assert result.metrics is None  # no labels: nothing to score, the answers are still written

    md = json.loads(md_path.read_text())
    images = pd.read_csv(result.paths["image_answers"], keep_default_na=False)
    assert len(images) == len(md["images"]) == 31
    blank = {im["file"] for im in md["images"] if not any(d["conf"] >= 0.2 for d in im.get("detections") or [])}
    assert set(images.loc[images["answer"] == "blank", "file"]) == blank and len(blank) == 14
    answered = images[images["answer"] != "blank"]
    assert (answered["source"] == "classifier").all()
    assert "ocelot" in set(answered["answer"])  # the sure crop keeps its species; the rest roll up or are unknown
    assert set(result.table["answer_rank"]) - {"species"}

    out = json.loads(result.paths["megadetector"].read_text())
    categories = out["classification_categories"]
    assert set(out["classification_category_descriptions"]) == set(categories)
    assert categories[str(names.index("ocelot"))] == "ocelot" and "unknown" in categories.values()
    classified = [d for im in out["images"] for d in im.get("detections") or [] if "classifications" in d]
    assert len(classified) == len(manifest) == 30
    assert all(len(d["classifications"]) == 1 for d in classified)


# ---------------------------------------------------------------- through predict.py


@pytest.mark.slow
def test_predict_writes_raw_and_postprocessed_answers_side_by_side(trained: TrainedRun, kernel_env: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = trained.config
    config.write_text(config.read_text() + "postprocess:\n  calibrate: true\n  sequence: mean\n  abstain: true\n"
                      "  target_precision: 0.8\n")
    val = predict_here("--config", config, "--checkpoint", "best", "--split", "val")
    assert val.returncode == 0, val.stderr
    fitted = json.loads((trained.run_dir / "postprocess" / "best.json").read_text())
    assert fitted["temperature"] > 0 and fitted["target_precision"] == 0.8 and fitted["fitted_on"] == "val"
    test = predict_here("--config", config, "--checkpoint", "best", "--split", "test")
    assert test.returncode == 0, test.stderr
    output = trained.run_dir / "predictions" / "test_best"
    raw = pd.read_csv(output / "predictions.csv", keep_default_na=False)
    post = pd.read_csv(output / "postprocessed.csv", keep_default_na=False)
    assert post["path"].tolist() == raw["path"].tolist() and post["raw_label"].tolist() == raw["pred_label"].tolist()
    metrics = json.loads((output / "postprocess_metrics.json").read_text())
    assert metrics["skipped"] is None and metrics["fitted"]["checkpoint_sha256"] == fitted["checkpoint_sha256"]
    assert list(metrics["stages"]) == ["raw", "calibrated", "sequence"]
    assert metrics["stages"]["raw"]["top1"] == pytest.approx(json.loads((output / "metrics.json").read_text())["top1"])
    levels = metrics["levels"]
    assert levels["sequence"]["n_groups"] < levels["image"]["n_groups"] <= levels["detection"]["n"]  # demo: 3 frames a sequence
    assert (post.groupby("seq_id")["pred_label"].nunique() == 1).all()

    monkeypatch.setenv("RUN_DIR", str(trained.run_dir))
    monkeypatch.setenv("PREDICTIONS_DIR", str(output))
    notebook = run_notebook("evaluate_results.ipynb")
    text = outputs_text(cell(notebook, "postprocess"))
    assert "calibrated" in text and "sequence" in text


@pytest.mark.slow
def test_predict_megadetector_input_with_taxonomy_writes_descriptions_and_image_answers(
        trained: TrainedRun, md_crops: tuple[Path, Path], tmp_path: Path) -> None:
    md_path, crops = md_crops
    settings = yaml.safe_load(trained.config.read_text())
    (trained.run_dir / "taxonomy_demo.csv").write_text("label,genus,family,order,class\nbird,,,,aves\n"
                                                       "deer,,cervidae,artiodactyla,mammalia\nrabbit,,leporidae,lagomorpha,mammalia\n"
                                                       "wild_boar,sus,suidae,artiodactyla,mammalia\n")
    settings["postprocess"] = {"taxonomy": "taxonomy_demo.csv", "image_smoothing": True, "rollup_threshold": 0.7}
    config = trained.run_dir / "config_md.yml"
    config.write_text(yaml.safe_dump(settings))
    result = predict_here("--config", config, "--checkpoint", "last", "--megadetector", md_path, "--crops-dir", crops,
                          "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    raw = json.loads((tmp_path / "out" / "md_v5a_output_classified.json").read_text())
    assert raw["classification_category_descriptions"]["1"].split(";")[1:] == ["mammalia", "artiodactyla", "cervidae", "", "", "deer"]
    post = json.loads((tmp_path / "out" / "md_v5a_output_postprocessed.json").read_text())
    assert set(post["classification_category_descriptions"]) == set(post["classification_categories"])
    images = pd.read_csv(tmp_path / "out" / "image_answers.csv", keep_default_na=False)
    assert len(images) == 31 and (images["answer"] == "blank").sum() == 14
    assert not (trained.run_dir / "postprocess" / "last.json").exists()  # nothing to fit without calibrate/abstain


@pytest.mark.slow
def test_postprocess_reads_every_class_probability_whatever_topk(trained: TrainedRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """predict.py keeps every class's probability for the post-prediction stage: the top-k approximation
    (``probabilities_from_topk``, for tables read back from disk) is not used, and --topk changes nothing in it."""
    def approximation_used(*_args: object) -> None:
        raise AssertionError("post-processing read the top-k approximation")

    monkeypatch.setattr(predict_module, "probabilities_from_topk", approximation_used)
    config = trained.config.with_name("config_topk.yml")  # beside config.yml: the same relative paths
    config.write_text(trained.config.read_text().split("postprocess:")[0] + "postprocess:\n  sequence: mean\n")
    answers = {}
    for topk in (1, 100):  # 100: every class (k is capped at the number of classes)
        out = config.parent / f"predictions_top{topk}"
        result = predict_here("--config", config, "--checkpoint", "best", "--split", "test", "--topk", str(topk), "--output-dir", out)
        assert result.returncode == 0, result.stderr
        answers[topk] = pd.read_csv(out / "postprocessed.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(answers[1], answers[100])
