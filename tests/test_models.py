"""Models by name (torchvision, timm), head replacement, local weights files, freezing, features."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from classification.errors import DataError, UserError
from classification.training.models import (
    build_model,
    embedding_dim,
    forward_features,
    head_name,
    pretrained_weights,
    resolve_architecture,
    set_backbone_trainable,
    wanted_weights,
)
from tests.helpers.training import write_run

X = torch.rand(2, 3, 64, 64)


@pytest.mark.parametrize(
    ("architecture", "head", "dim"),
    [("resnet18", "fc", 512), ("mobilenet_v3_small", "classifier.3", 1024), ("efficientnet_b0", "classifier.1", 1280),
     ("timm:test_resnet", "fc", 96), ("test_vit", "head", 64)],
)
def test_build_model_outputs_and_features(architecture: str, head: str, dim: int) -> None:
    torch.manual_seed(0)
    model = build_model(architecture, 5, pretrained=False).eval()
    assert head_name(model) == head and embedding_dim(model) == dim
    with torch.no_grad():
        logits = model(X)
        features = forward_features(model, X)
    assert logits.shape == (2, 5) and features.shape == (2, dim)
    assert torch.allclose(model.get_submodule(head)(features), logits, atol=1e-5)  # the head's exact input


def test_architecture_lookup() -> None:
    assert resolve_architecture("resnet18") == ("torchvision", "resnet18")
    assert resolve_architecture("resnet10t") == ("timm", "resnet10t")
    assert resolve_architecture("timm:resnet18") == ("timm", "resnet18")
    assert resolve_architecture("convnext_atto.d2_in1k") == ("timm", "convnext_atto.d2_in1k")
    with pytest.raises(UserError, match=r"unknown model 'resnet-18' \(did you mean resnet18.*timm:"):
        build_model("resnet-18", 3, pretrained=False)
    with pytest.raises(UserError, match="unknown library prefix"):
        resolve_architecture("keras:resnet18")


def test_pretrained_request_resolves_without_download() -> None:
    weights = pretrained_weights("resnet18")
    assert weights.name == "IMAGENET1K_V1" and weights.url.endswith(".pth")
    assert len(weights.meta["categories"]) == 1000


def state_of(model: nn.Module, skip: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}


def test_weights_file_round_trip_skips_a_different_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    source = build_model("resnet18", 5, pretrained=False)
    files = {"raw.pt": source.state_dict(), "checkpoint.pth": {"model": source.state_dict(), "epoch": 3},
             "ddp.pt": {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
             "headless.pt": state_of(source, "fc.")}
    for name, data in files.items():
        torch.save(data, tmp_path / name)
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    for name in [*files, "weights.safetensors"]:
        torch.manual_seed(1)
        with caplog.at_level("WARNING"):
            model = build_model("resnet18", 3, pretrained=False, weights_file=tmp_path / name)
        backbone, expected = state_of(model, "fc."), state_of(source, "fc.")
        assert backbone.keys() == expected.keys() and all(torch.equal(backbone[k], expected[k]) for k in expected), name
        assert isinstance(model.fc, torch.nn.Linear) and model.fc.out_features == 3
        assert "head weights not loaded" in caplog.text and "fc.bias, fc.weight" in caplog.text
        caplog.clear()
    same_head = build_model("resnet18", 5, pretrained=False, weights_file=tmp_path / "raw.pt")
    assert torch.equal(same_head.state_dict()["fc.weight"], source.state_dict()["fc.weight"])


def test_weights_file_for_another_model_is_one_line_error(tmp_path: Path) -> None:
    torch.save(build_model("mobilenet_v3_small", 3, pretrained=False).state_dict(), tmp_path / "mobilenet.pt")
    with pytest.raises(DataError, match=r"mobilenet\.pt: does not fit this model \(ResNet\): \d+ missing keys") as error:
        build_model("resnet18", 3, pretrained=False, weights_file=tmp_path / "mobilenet.pt")
    assert "\n" not in str(error.value)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.pt: not a readable PyTorch weights file"):
        build_model("resnet18", 3, pretrained=False, weights_file=tmp_path / "junk.pt")
    with pytest.raises(DataError, match="weights file not found"):
        build_model("resnet18", 3, pretrained=False, weights_file=tmp_path / "missing.pt")


@pytest.mark.parametrize("architecture", ["mobilenet_v3_small", "timm:test_resnet"])
def test_freezing_leaves_only_the_head_trainable(architecture: str) -> None:
    model = build_model(architecture, 4, pretrained=False)
    set_backbone_trainable(model, False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = head_name(model)
    assert trainable == {f"{head}.weight", f"{head}.bias"}
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


def test_wanted_weights_is_a_typed_library_function(tmp_path: Path) -> None:
    """What fetch_weights.py fetches: typed pairs from the configs and the names, each once; nothing is one line."""

    hints = typing.get_type_hints(wanted_weights)
    assert hints["return"] == list[tuple[str, typing.Literal["library", "package"]]]
    package = write_run(tmp_path / "a", tmp_path, architecture="efficientnet_lite0", pretrained=True, pretrained_source="package")
    scratch = write_run(tmp_path / "b", tmp_path, pretrained=False)
    assert wanted_weights([package, scratch, package], ["resnet18"], "library") == [("resnet18", "library"),
                                                                                  ("efficientnet_lite0", "package")]
    with pytest.raises(UserError, match="nothing to fetch"):
        wanted_weights([scratch], [])
