"""The experiment config: one-line errors with suggestions, paths, overrides, animl-ml configs, hashing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from classification.config import (
    ExperimentConfig,
    check_num_classes,
    config_changes,
    config_hash,
    load_config,
)
from classification.errors import DataError, UserError
from classification.training.run_folder import write_run_files
from tests.helpers.processes import run_entry_point
from tests.helpers.training import ANIML_CONFIG


def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    """The one-line message load_config raises for ``text``."""
    with pytest.raises(UserError) as caught:
        load_config(write_config(tmp_path / "runs" / "x", text), overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_typo_is_one_line_with_suggestion_and_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "runs" / "x", "data_root: data\nlearning_rte: 0.1\n")
    result = run_entry_point("classifier/train.py", "--config", config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {config}: learning_rte: unknown key (did you mean learning_rate?)"]
    assert "Traceback" not in result.stderr + result.stdout


def test_wrong_types_and_impossible_values_name_the_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, "data_root: d\nbatch_size: abc\n")
    assert message.endswith("config.yml: batch_size: expected an integer, got 'abc'")
    assert "num_epochs: expected an integer, got 2.5" in load_error(tmp_path, "data_root: d\nnum_epochs: 2.5\n")
    assert "pretrained: expected true or false, got 'maybe'" in load_error(tmp_path, "data_root: d\npretrained: maybe\n")
    assert "batch_size: must be greater than or equal to 1, got 0" in load_error(tmp_path, "data_root: d\nbatch_size: 0\n")
    assert "label_smoothing: must be less than 1, got 1.0" in load_error(tmp_path, "data_root: d\nlabel_smoothing: 1.0\n")
    assert "learning_rate: must be greater than 0, got -0.1" in load_error(tmp_path, "data_root: d\nlearning_rate: -0.1\n")
    assert "optimizer: expected one of sgd, adamw, got 'adam' (did you mean adamw?)" in load_error(
        tmp_path, "data_root: d\noptimizer: adam\n")
    assert "monitor: expected one of val_loss" in load_error(tmp_path, "data_root: d\nmonitor: val_acc\n")
    assert "device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'" in load_error(tmp_path, "data_root: d\ndevice: gpu\n")
    assert "data_root: required key is missing" in load_error(tmp_path, "seed: 1\n")
    # several problems: still one line, the typo first
    message = load_error(tmp_path, "data_root: d\nbatch_size: x\nlearnig_rate: 1\n")
    assert message.index("learnig_rate") < message.index("batch_size")


def test_malformed_yaml_and_wrong_top_level(tmp_path: Path) -> None:
    assert "not valid YAML" in load_error(tmp_path, "data_root: d\n  x: [\n") and "line 2" in load_error(tmp_path, "data_root: d\n  x: [\n")
    assert "expected a mapping" in load_error(tmp_path, "- a\n- b\n")
    assert "empty config" in load_error(tmp_path, "# nothing\n")
    with pytest.raises(DataError, match="file not found"):
        load_config(tmp_path / "missing.yml")


def test_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path.parent)  # resolution never depends on the current folder
    config_path = write_config(tmp_path / "runs" / "m" / "e",
                               "data_root: ../../../data/ds\ncrops_dir: ../crops\nweights_file: w.pt\n")
    config = load_config(config_path)
    assert config.data_root == tmp_path / "data" / "ds"
    assert config.crops_dir == tmp_path / "data" / "crops"  # relative to data_root, as animl-ml reads it
    assert config.weights_file == tmp_path / "runs" / "m" / "e" / "w.pt"
    assert load_config(write_config(tmp_path / "abs", f"data_root: {tmp_path}/x\n")).data_root == tmp_path / "x"
    default = load_config(write_config(tmp_path / "d", "data_root: ds\n"))
    assert default.crops_dir is None and default.resolved_crops_dir() == tmp_path / "d" / "ds"
    home = load_config(write_config(tmp_path / "h", "data_root: ~/ds\n"))
    assert home.data_root == Path.home() / "ds"


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path: Path) -> None:
    path = write_config(tmp_path / "r", "data_root: ds\nlearning_rate: 0.1\n")
    config = load_config(path, ["learning_rate=1e-3", "ema_decay=0.99", "early_stopping_patience=null",
                                "pretrained=false", "image_size=[64, 64]"])
    assert (config.learning_rate, config.ema_decay, config.early_stopping_patience, config.pretrained, config.image_size) == (
        0.001, 0.99, None, False, 64)
    assert "batch_sze: unknown key (did you mean batch_size?)" in load_error(tmp_path, "data_root: d\n", ("batch_sze=4",))
    with pytest.raises(UserError, match="expected key=value"):
        load_config(path, ["learning_rate"])


def test_animl_ml_config_works_unchanged(tmp_path: Path) -> None:
    data_root = tmp_path / "data" / "processed" / "animl"
    config = load_config(write_config(tmp_path / "runs" / "resnet-18" / "baseline", ANIML_CONFIG.format(data_root=data_root)))
    assert config.seed == 32678456782 and config.device == "cuda:3" and config.num_workers == 20
    assert config.crops_dir == data_root / "crops"
    assert (config.num_classes, config.image_size, config.num_epochs, config.batch_size) == (9, 224, 200, 1024)
    assert (config.learning_rate, config.weight_decay) == (0.001, 0.001)
    assert "crops are square" in load_error(tmp_path, "data_root: d\nimage_size: [224, 192]\n")


def test_num_classes_must_match_label_index(tmp_path: Path) -> None:
    config = ExperimentConfig(data_root=tmp_path, num_classes=3)
    check_num_classes(config, {0: "a", 1: "b", 2: "c"})
    with pytest.raises(DataError, match=r"num_classes: 3, but .*label_index.json has 4 labels"):
        check_num_classes(config, {0: "a", 1: "b", 2: "c", 3: "d"}, tmp_path / "config.yml")
    check_num_classes(ExperimentConfig(data_root=tmp_path), {0: "a", 1: "b"})  # not stated: read from the dataset


def test_config_hash_covers_training_fields_only(tmp_path: Path) -> None:
    base = ExperimentConfig(data_root=tmp_path)
    same = base.model_copy(update={"num_workers": 7, "device": "cpu", "num_epochs": 99, "comet": "off",
                                   "checkpoint_keep_last": 0, "early_stopping_patience": 3, "data_root": tmp_path / "moved"})
    assert config_hash(same) == config_hash(base)
    changed = base.model_copy(update={"learning_rate": 0.5, "augmentation": "strong"})
    assert config_hash(changed) != config_hash(base)
    assert config_changes(base.to_dict(), changed) == ["augmentation: 'light' -> 'strong'", "learning_rate: 0.01 -> 0.5"]
    assert config_hash(base.to_dict()) == config_hash(base)


def test_run_files_record_config_versions_and_command_without_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMET_API_KEY", "not-a-real-key-0123456789")
    config = load_config(write_config(tmp_path, "data_root: ds\n"), ["batch_size=4"])
    write_run_files(tmp_path, config, ["classifier/train.py", "--config", "config.yml", "--set", "batch_size=4"], ["batch_size=4"])
    resolved = yaml.safe_load((tmp_path / "resolved_config.yml").read_text())
    assert resolved["batch_size"] == 4 and resolved["data_root"] == str(tmp_path / "ds") and resolved["momentum"] == 0.9
    assert ExperimentConfig.model_validate(resolved) == config  # the resolved config loads back as the same config
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["overrides"] == ["batch_size=4"] and info["command"][-2:] == ["--set", "batch_size=4"]
    assert info["packages"]["torch"] and info["packages"]["timm"] and info["packages"]["comet-ml"]
    assert info["started_utc"].endswith("+00:00") and info["config_hash"] == config_hash(config)
    for name in ("resolved_config.yml", "run_info.json"):
        assert "not-a-real-key" not in (tmp_path / name).read_text()


def test_yaml_on_off_words(tmp_path: Path) -> None:
    """Unquoted on/off are booleans in YAML; they mean the option words here."""
    config = load_config(write_config(tmp_path, "data_root: d\ncomet: off\namp: off\nchannels_last: on\n"))
    assert (config.comet, config.amp, config.channels_last) == ("off", "off", "on")
    assert load_config(write_config(tmp_path, "data_root: d\ncomet: on\n")).comet == "auto"
    assert "amp: expected one of off, bf16, fp16, got True" in load_error(tmp_path, "data_root: d\namp: on\n")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "runs").glob("*/*/config.yml")),
                         ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_every_shipped_experiment_config_is_valid(path: Path) -> None:
    config = load_config(path)  # no typo, wrong type or impossible value in what the repository ships
    assert config.data_root.is_absolute() and config.data_root.parent.name in ("processed", "interim")
    if config.active_learning.pool is not None:
        assert config.active_learning.pool.is_absolute()


def test_bad_input_statistics_name_the_key(tmp_path: Path) -> None:
    assert "pretrained_source: expected one of library, package, got 'pakage' (did you mean package?)" in load_error(
        tmp_path, "data_root: d\npretrained_source: pakage\n")
    assert "mean: give 3 values, one per RGB channel, got 2: [1, 2]" in load_error(tmp_path, "data_root: d\nmean: [1, 2]\n")
    assert "std: every channel's std must be positive" in load_error(tmp_path, "data_root: d\nstd: [0, 0, 0]\n")
    assert "interpolation: expected one of bilinear, bicubic, nearest, got 'cubic' (did you mean bicubic?)" in load_error(
        tmp_path, "data_root: d\ninterpolation: cubic\n")
    scale = load_error(tmp_path, "data_root: d\nmean: [123.7, 116.3, 103.5]\n")  # 0-255 statistics
    assert "mean: pixels are scaled to [0, 1]" in scale and "divide them by 255" in scale
    assert "std: pixels are scaled to [0, 1]" in load_error(tmp_path, "data_root: d\nstd: [58.4, 57.1, 57.4]\n")


def test_every_float_is_finite_and_in_range(tmp_path: Path) -> None:
    """``learning_rate: .inf`` or ``1e308`` trained to a NaN loss and saved best.pt with exit 0: refused, naming the key."""
    assert "learning_rate: must be a finite number, got inf" in load_error(tmp_path, "data_root: d\nlearning_rate: .inf\n")
    assert "learning_rate: must be less than or equal to 10" in load_error(tmp_path, "data_root: d\nlearning_rate: 1e308\n")
    assert "weight_decay: must be a finite number" in load_error(tmp_path, "data_root: d\nweight_decay: .nan\n")
    assert "weight_decay: must be less than or equal to 1" in load_error(tmp_path, "data_root: d\nweight_decay: 5.0\n")
    assert "momentum: expected a number, got true" in load_error(tmp_path, "data_root: d\nmomentum: yes\n")
    assert "mean[0]: must be a finite number" in load_error(tmp_path, "data_root: d\nmean: [.nan, 0.4, 0.4]\n")
    assert "postprocess.sequence_gap_s: must be a finite number" in load_error(
        tmp_path, "data_root: d\npostprocess:\n  sequence_gap_s: .inf\n")
    assert "active_learning.diversity_weight: must be a finite number" in load_error(
        tmp_path, "data_root: d\nactive_learning:\n  diversity_weight: .nan\n")
    assert "max_skipped_fraction: must be less than or equal to 1" in load_error(
        tmp_path, "data_root: d\nmax_skipped_fraction: 2\n")
    config = write_config(tmp_path / "runs" / "y", "data_root: data\nlearning_rate: .inf\n")
    result = run_entry_point("classifier/train.py", "--config", config)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {config}: learning_rate: must be a finite number, got inf"]


def test_ints_are_ints_not_booleans_or_text(tmp_path: Path) -> None:
    """``batch_size: yes`` was read as 1 and ``num_epochs: "8"`` as 8: every int field takes only an integer."""
    assert "batch_size: expected an integer, got True" in load_error(tmp_path, "data_root: d\nbatch_size: yes\n")
    assert "num_epochs: expected an integer, got '8'" in load_error(tmp_path, "data_root: d\nnum_epochs: '8'\n")
    assert "num_workers: expected an integer, got False" in load_error(tmp_path, "data_root: d\nnum_workers: no\n")
    assert "image_size: expected an integer, got True" in load_error(tmp_path, "data_root: d\nimage_size: on\n")
    assert "seed: expected an integer, got True" in load_error(tmp_path, "data_root: d\nseed: true\n")
    assert "active_learning.simulation.seeds[1]: expected an integer, got True" in load_error(
        tmp_path, "data_root: d\nactive_learning:\n  simulation:\n    seeds: [0, yes]\n")
    assert "batch_size: expected an integer, got True" in load_error(tmp_path, "data_root: d\n", ("batch_size=yes",))
    assert load_config(write_config(tmp_path / "ok", "data_root: d\nbatch_size: 8\nlearning_rate: 1e-3\n")).batch_size == 8
