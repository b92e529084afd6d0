"""Classification models by name from torchvision or timm, with a head for ``num_classes``.

``build_model("resnet18", 4, pretrained=True)`` looks the name up in torchvision's
classification models first, then in timm (``"timm:<name>"`` forces timm,
``"torchvision:<name>"`` torchvision). ``pretrained`` loads the library's ImageNet
weights (downloaded and cached by torch hub / Hugging Face on first use); a
``weights_file`` is a local state dict loaded on top, whose head is skipped when its
shape differs (fine-tuning from a model with other classes). The head module's name is
recorded on the model (``model._classification_head_name``) for freezing and for
``forward_features``.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch
import torchvision
from torch import Tensor, nn
from timm.models import split_model_name_tag

from classification.errors import DataError, UserError

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
    candidates = (torchvision_names() if library != "timm" else []) + (timm.list_models() if library != "torchvision" else [])
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
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


def build_torchvision(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    """A torchvision model with its last linear layer replaced by one for ``num_classes``."""
    kwargs = {"aux_logits": False} if name in NO_AUX_LOGITS else {}
    model = torchvision.models.get_model(name, weights=pretrained_weights(name) if pretrained else None, **kwargs)
    head_name = last_linear_name(model)
    head = model.get_submodule(head_name)
    replace_module(model, head_name, nn.Linear(head.in_features, num_classes))
    setattr(model, HEAD_ATTRIBUTE, head_name)
    return model


def build_timm(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    """A timm model created with a head for ``num_classes``."""
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    head_name = model.pretrained_cfg.get("classifier")
    if not isinstance(head_name, str) or not isinstance(model.get_submodule(head_name), nn.Linear):
        head_name = last_linear_name(model)
    setattr(model, HEAD_ATTRIBUTE, head_name)
    return model


def build_model(architecture: str, num_classes: int, pretrained: bool, weights_file: Path | None = None) -> nn.Module:
    """A classifier for ``num_classes``: library ImageNet weights when ``pretrained``, then ``weights_file``."""
    if num_classes < 1:
        raise UserError(f"num_classes: must be at least 1, got {num_classes}")
    library, name = resolve_architecture(architecture)
    model = build_torchvision(name, num_classes, pretrained) if library == "torchvision" else build_timm(name, num_classes, pretrained)
    if weights_file is not None:
        skipped = load_weights_file(model, Path(weights_file))
        if skipped:
            log.warning("%s: head weights not loaded (absent, or made for another number of classes than %d): %s",
                        weights_file, num_classes, ", ".join(skipped))
    return model


def head_name(model: nn.Module) -> str:
    """Dotted name of the classification head (recorded by ``build_model``)."""
    name = getattr(model, HEAD_ATTRIBUTE, None)
    return name if isinstance(name, str) else last_linear_name(model)


def head_module(model: nn.Module) -> nn.Linear:
    """The classification head."""
    return model.get_submodule(head_name(model))


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
        return model.forward_head(model.forward_features(x), pre_logits=True)
    captured: list[Tensor] = []
    handle = head_module(model).register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[-1].flatten(1)
