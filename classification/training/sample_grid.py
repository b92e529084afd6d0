"""A picture of the model at work: a grid of validation images captioned ``true -> predicted (confidence)``,
logged to the experiment tracker at the end of training."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from classification.training.data import CropDataset, load_image
from classification.training.trainer import Trainer

TILE = 128  # side of one sample-prediction tile, in pixels


def sample_prediction_grid(trainer: Trainer, loader: DataLoader, count: int, label_names: Mapping[int, str]) -> Image.Image | None:
    """A grid of ``count`` evenly spaced validation images captioned ``true -> predicted (confidence)``."""
    dataset = cast(CropDataset, loader.dataset)  # build_loader's
    if count <= 0 or len(dataset) == 0:
        return None
    indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset)))})
    batch = loader.collate_fn([dataset[i] for i in indices])  # the loader's own collation: normalised like training's
    if len(batch) == 0:
        return None
    model = trainer.eval_model()
    model.eval()
    with torch.inference_mode(), trainer.autocast():
        logits = model(trainer.to_device(batch.images)).float()
    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    items = list(zip(batch.indices.tolist(), batch.labels.tolist()))
    columns = min(4, len(items))
    rows = math.ceil(len(items) / columns)
    grid = Image.new("RGB", (columns * TILE, rows * (TILE + 28)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (index, label) in enumerate(items):
        x, y = (k % columns) * TILE, (k // columns) * (TILE + 28)
        grid.paste(load_image(dataset.samples[index].path, TILE).resize((TILE, TILE)), (x, y))
        colour = (0, 120, 0) if int(predicted[k]) == label else (200, 0, 0)
        draw.text((x + 2, y + TILE + 1), f"{label_names[label]}", fill=(0, 0, 0))
        draw.text((x + 2, y + TILE + 14), f"-> {label_names[int(predicted[k])]} {float(confidence[k]):.2f}", fill=colour)
    return grid
