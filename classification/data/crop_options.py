"""How to crop: ``CropOptions``, the command line's flags (``utils/crop_detections.py``), checked in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from classification.data.cct import MissingLocationRule
from classification.data.crop_geometry import CROP_STRATEGIES, CropStrategy
from classification.data.detections import DEFAULT_DETECTOR_CATEGORIES, DEFAULT_THRESHOLD
from classification.errors import UserError
from classification.shards import DaskOptions

__all__ = ["DEFAULT_MAX_CROP_SIDE", "CropOptions"]

# A crop's side before --max-size: 8192 px (200 MB as RGB) is far above any model input and above a whole
# 24 MP frame; a larger one comes from a header declaring a huge image, and is refused unless asked for.
DEFAULT_MAX_CROP_SIDE = 8192


@dataclass(frozen=True)
class CropOptions:
    """How to crop; the command line's flags."""

    crop_strategy: CropStrategy = "square"
    threads: int = 1
    threshold: float = DEFAULT_THRESHOLD
    detector_categories: tuple[str, ...] = DEFAULT_DETECTOR_CATEGORIES
    labels_cct: Path | None = None
    max_size: int | None = None
    max_crop_side: int = DEFAULT_MAX_CROP_SIDE
    missing_locations: MissingLocationRule = "sequence"
    dataset: str | None = None
    quality: int = 90
    check_crops_valid: bool = False
    images_base_url: str | None = None
    save_full_images: bool = False
    logdir: Path | None = None
    progress: bool | None = None
    dask: DaskOptions = DaskOptions()

    def validate(self) -> None:
        """Raise a one-line ``UserError`` for a value out of range."""
        self.dask.validate()
        if self.crop_strategy not in CROP_STRATEGIES:
            raise UserError(f"--crop-strategy must be one of {', '.join(CROP_STRATEGIES)}, got {self.crop_strategy!r}")
        if self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.max_size is not None and self.max_size < 1:
            raise UserError(f"--max-size must be at least 1, got {self.max_size}")
        if self.max_crop_side < 1:
            raise UserError(f"--max-crop-side must be at least 1, got {self.max_crop_side}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be between 1 and 100, got {self.quality}")
