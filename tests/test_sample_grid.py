"""The sample-prediction grid logged at the end of training feeds the model exactly what validation does."""

from __future__ import annotations

from pathlib import Path

import torch

from classification.config import load_config
from classification.data.samples import build_samples, load_label_index
from classification.runtime import DistributedContext
from classification.training.data import build_loader
from classification.training.models import resolve_inputs
from classification.training.sample_grid import TILE, sample_prediction_grid
from classification.training.trainer import build_trainer
from tests.helpers.training import build_dataset, write_run


def test_sample_grid_predicts_on_normalised_images_like_validation(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path, n_locations=4, sequences=2, frames=1)
    config = resolve_inputs(load_config(write_run(tmp_path / "run", dataset)))  # as the training run does
    label_index = load_label_index(config.data_root)
    loader = build_loader(config, build_samples(config, "val"), train=False)
    trainer = build_trainer(config, len(label_index), [0], 1, torch.device("cpu"), DistributedContext())
    seen: list[torch.Tensor] = []
    trainer.model.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0].detach().clone()))

    grid = sample_prediction_grid(trainer, loader, 3, label_index)

    assert grid is not None and grid.width == 3 * TILE
    first = next(iter(loader))  # validation's own batch (in order, so it starts with the grid's first image)
    assert seen[0].dtype == torch.float32 and seen[0].shape[1:] == first.images.shape[1:]
    assert torch.equal(seen[0][0], first.images[0])  # normalised floats, not the items' raw uint8 pixels
