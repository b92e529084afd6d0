"""training/inference.py: the one batched-inference path (prediction, embeddings, triplet inference, head rounds)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from classification.config import ExperimentConfig
from classification.data.samples import Sample
from classification.errors import UserError
from classification.training.data import build_loader
from classification.training.inference import (
    EMBEDDINGS,
    PROBABILITIES,
    TOP_K_OUTPUTS,
    ChunkCache,
    InferenceOptions,
    embeddings,
    embeddings_and_probabilities,
    inference_options,
    probabilities,
    run_in_chunks,
    run_inference,
    top_k_probabilities,
)
from classification.training.models import build_model, resolve_inputs

ARCHITECTURE = "timm:test_efficientnet"
CPU = torch.device("cpu")


def write_samples(folder: Path, count: int, broken: tuple[int, ...] = ()) -> list[Sample]:
    """``count`` small JPEGs (labels 0/1 alternating); the positions in ``broken`` are not images."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        path = folder / f"{i:02d}.jpg"
        if i in broken:
            path.write_bytes(b"not a jpeg")
        else:
            Image.new("RGB", (40, 36), (20 * i % 256, 100, 255 - 15 * i % 256)).save(path)
        samples.append(Sample(path, i % 2, "", ""))
    return samples


def tiny_config(root: Path, **updates: object) -> ExperimentConfig:
    settings: dict[str, object] = {"architecture": ARCHITECTURE, "pretrained": False, "image_size": 32, "batch_size": 3,
                                   "num_workers": 0, "device": "cpu", **updates}
    return resolve_inputs(ExperimentConfig(data_root=root, **settings))  # as a run or the embeddings resolve it


def tiny_model(architecture: str = ARCHITECTURE) -> nn.Module:
    torch.manual_seed(0)
    return build_model(architecture, 3, pretrained=False).eval()


def reference_logits(model: nn.Module, config: ExperimentConfig, samples: list[Sample]) -> tuple[list[int], Tensor]:
    """The readable samples' positions and their logits, one plain float32 batch at a time."""
    positions, logits = [], []
    with torch.no_grad():
        for batch in build_loader(config, samples, train=False):
            if len(batch):
                positions += batch.indices.tolist()
                logits.append(model(batch.images))
    return positions, torch.cat(logits)


def test_outputs_are_in_input_order_and_unreadable_images_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = write_samples(tmp_path / "images", 7, broken=(1, 5))
    (tmp_path / "images" / "03.jpg").unlink()  # and one missing file
    config, model = tiny_config(tmp_path), tiny_model()
    with caplog.at_level(logging.WARNING, logger="classification.training.inference"):
        result = run_inference(model, build_loader(config, samples, train=False), probabilities, (PROBABILITIES,),
                               inference_options(config, CPU), "predict")
    assert result.indices.tolist() == [0, 2, 4, 6] and result.skipped == [1, 3, 5] and len(result) == 4
    assert "predict: 3 of 7 images could not be read and were skipped" in caplog.text
    positions, logits = reference_logits(model, config, samples)
    assert positions == [0, 2, 4, 6]
    np.testing.assert_allclose(result.outputs[PROBABILITIES], torch.softmax(logits, 1).numpy(), rtol=1e-5, atol=1e-6)
    assert result.outputs[PROBABILITIES].dtype == np.float32 and result.images_per_second > 0


def test_top_k_gives_the_true_labels_probability_or_nan(tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "images", 4)
    samples[2] = Sample(samples[2].path, -1, "", "")  # true class unknown
    config, model = tiny_config(tmp_path), tiny_model()
    result = run_inference(model, build_loader(config, samples, train=False), top_k_probabilities(2), TOP_K_OUTPUTS,
                           inference_options(config, CPU))
    full = torch.softmax(reference_logits(model, config, samples)[1], 1).numpy()
    classes, values, true = (result.outputs[name] for name in TOP_K_OUTPUTS)
    assert classes.shape == values.shape == (4, 2) and classes.dtype == np.int64
    np.testing.assert_array_equal(classes[:, 0], full.argmax(1))
    np.testing.assert_allclose(values[:, 0], full.max(1), rtol=1e-5)
    np.testing.assert_allclose(true[[0, 1, 3]], full[[0, 1, 3], [0, 1, 1]], rtol=1e-5)
    assert np.isnan(true[2])


def test_embeddings_come_from_the_feature_hook_in_the_same_pass(tmp_path: Path) -> None:
    """torchvision models: features through the hook on the head; the probabilities are the head's on them."""
    samples = write_samples(tmp_path / "images", 3)
    config, model = tiny_config(tmp_path, architecture="resnet18"), tiny_model("resnet18")
    loader = build_loader(config, samples, train=False)
    both = run_inference(model, loader, embeddings_and_probabilities, (EMBEDDINGS, PROBABILITIES), inference_options(config, CPU))
    alone = run_inference(model, loader, embeddings, (EMBEDDINGS,), inference_options(config, CPU))
    assert both.outputs[EMBEDDINGS].shape == (3, 512)
    np.testing.assert_array_equal(both.outputs[EMBEDDINGS], alone.outputs[EMBEDDINGS])
    logits = reference_logits(model, config, samples)[1]
    np.testing.assert_allclose(both.outputs[PROBABILITIES], torch.softmax(logits, 1).numpy(), rtol=1e-4, atol=1e-6)


def test_amp_and_channels_last_on_the_cpu(tmp_path: Path) -> None:
    """bf16 autocast (where the CPU supports it) and channels_last give float32 outputs close to float32's."""
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("this torch has no CPU autocast")
    samples = write_samples(tmp_path / "images", 4, broken=(2,))
    config, model = tiny_config(tmp_path), tiny_model()
    loader = build_loader(config, samples, train=False)
    plain = run_inference(model, loader, probabilities, (PROBABILITIES,), InferenceOptions(CPU))
    fast = run_inference(model, loader, probabilities, (PROBABILITIES,), InferenceOptions(CPU, torch.bfloat16, True))
    convolution = next(p for p in model.parameters() if p.dim() == 4)
    assert convolution.is_contiguous(memory_format=torch.channels_last)
    assert fast.indices.tolist() == plain.indices.tolist() == [0, 1, 3] and fast.skipped == [2]
    assert fast.outputs[PROBABILITIES].dtype == np.float32
    np.testing.assert_allclose(fast.outputs[PROBABILITIES], plain.outputs[PROBABILITIES], atol=0.05)
    assert inference_options(tiny_config(tmp_path, amp="bf16", channels_last="on"), CPU) == InferenceOptions(CPU, None, True)
    assert inference_options(tiny_config(tmp_path), CPU).channels_last  # auto: faster on the CPU too
    assert not inference_options(tiny_config(tmp_path, channels_last="off"), CPU).channels_last
    assert not inference_options(tiny_config(tmp_path), torch.device("mps")).channels_last
    model.train()(torch.zeros(2, 3, 32, 32)).sum().backward()  # converted outside inference_mode: still trainable
    assert convolution.grad is not None


class Interrupt(Exception):
    """Stands for a crash or Ctrl-C in the middle of a pool."""


def counting(limit: int | None, calls: list[int]):
    """``embeddings`` that counts its batches and raises ``Interrupt`` at batch number ``limit``."""
    def compute(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        if limit is not None and len(calls) == limit:
            raise Interrupt
        calls.append(len(images))
        return embeddings(model, images, labels)
    return compute


def test_chunks_resume_where_an_interrupted_run_stopped(tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "images", 10, broken=(4,))
    config, model = tiny_config(tmp_path), tiny_model()
    options, key = inference_options(config, CPU), {"model": "tiny", "n": 10}
    make_loader = lambda part: build_loader(config, part, train=False)  # noqa: E731
    cache = ChunkCache(tmp_path / "chunks", key)
    calls: list[int] = []
    with pytest.raises(Interrupt):  # chunks of 4 images: 2 batches of 3 then 1 each; stop in the second chunk
        run_in_chunks(model, samples, make_loader, counting(3, calls), (EMBEDDINGS,), options, 4, cache, "embed")
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["cache.json", "chunk_000000000.npz"]
    calls.clear()
    resumed = run_in_chunks(model, samples, make_loader, counting(None, calls), (EMBEDDINGS,), options, 4, cache, "embed")
    assert sum(calls) == 5  # images 4..9 less the broken one: the first chunk was not computed again
    whole = run_in_chunks(model, samples, make_loader, embeddings, (EMBEDDINGS,), options, 100)
    assert resumed.indices.tolist() == whole.indices.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert resumed.skipped == whole.skipped == [4]
    np.testing.assert_allclose(resumed.outputs[EMBEDDINGS], whole.outputs[EMBEDDINGS], rtol=1e-5, atol=1e-6)
    calls.clear()
    run_in_chunks(model, samples, make_loader, counting(None, calls), (EMBEDDINGS,), options, 4, cache)
    assert calls == []  # everything cached
    run_in_chunks(model, samples, make_loader, counting(None, calls), (EMBEDDINGS,), options, 4,
                  ChunkCache(tmp_path / "chunks", {**key, "model": "other"}))
    assert sum(calls) == 9  # another key: every chunk made again
    with pytest.raises(UserError, match="chunk_size must be at least 1, got 0"):
        run_in_chunks(model, samples, make_loader, embeddings, (EMBEDDINGS,), options, 0)


def test_chunks_in_the_earlier_format_are_reused_and_incomplete_ones_made_again(tmp_path: Path) -> None:
    """embeddings.py's chunks (kept, embeddings, probabilities, skipped) load as they are; one without a
    requested output is computed again."""
    samples = write_samples(tmp_path / "images", 2)
    config, model = tiny_config(tmp_path), tiny_model()
    cache = ChunkCache(tmp_path / "chunks", {"model": "tiny"})
    cache.directory.mkdir()
    (cache.directory / "cache.json").write_text('{"model": "tiny"}')
    earlier: dict[str, Any] = {"kept": np.array([1, 0]), "embeddings": np.full((2, 5), 7, np.float32),
               "probabilities": np.zeros((0, 0), np.float32), "skipped": np.zeros(0, np.int64)}
    np.savez(cache.chunk_path(0), **earlier)
    make_loader = lambda part: build_loader(config, part, train=False)  # noqa: E731
    options = inference_options(config, CPU)
    calls: list[int] = []
    reused = run_in_chunks(model, samples, make_loader, counting(None, calls), (EMBEDDINGS,), options, 2, cache)
    assert calls == [] and reused.indices.tolist() == [0, 1] and (reused.outputs[EMBEDDINGS] == 7).all()
    both = run_in_chunks(model, samples, make_loader, embeddings_and_probabilities, (EMBEDDINGS, PROBABILITIES), options, 2, cache)
    assert both.outputs[PROBABILITIES].shape == (2, 3) and not (both.outputs[EMBEDDINGS] == 7).any()
