"""Training data: fast decoding, transforms and loaders over the samples of ``data.samples``.

Determinism: the order of samples is a pure function of ``(seed, epoch)``
(``EpochSampler``) and the augmentation of one sample a pure function of ``(seed,
epoch, index)`` (``CropDataset``), so batches do not depend on the number of workers,
on the order in which workers run, or on resuming in the middle of an epoch.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from classification.data.images import ImageLoadError, decode_failure, read_rgb
from classification.data.samples import Sample
from classification.errors import DataError, UserError
from classification.training.weights import InputSpec

if TYPE_CHECKING:
    from classification.config import ExperimentConfig

log = logging.getLogger(__name__)

MIN_CROP_SCALE = 0.6  # RandomResizedCrop keeps at least this fraction of the area
Augmentation = Literal["none", "light", "strong"]


# ---------------------------------------------------------------- images and transforms


def use_accimage() -> bool:
    """True when the user set torchvision's image backend to accimage (conda-only; optional): its pixels
    differ from the shared decoder's (docs/training.md, "Decoding images")."""
    return torchvision.get_image_backend() == "accimage"


def load_accimage(path: Path) -> Tensor:
    """Decode with accimage (libjpeg-turbo) into a uint8 CHW image. Not the shared decoder: no EXIF
    rotation, no reduced-scale decode (see ``CropDataset.read``); a failure is the same one line."""
    import accimage  # noqa: PLC0415 - only when the user selected the backend

    try:
        image = accimage.Image(str(path))
    except (OSError, ValueError) as error:
        raise ImageLoadError(f"{path}: {decode_failure(error)}") from None
    array = np.zeros((image.channels, image.height, image.width), dtype=np.uint8)
    image.copyto(array)
    return torchvision.tv_tensors.Image(torch.from_numpy(array))


def load_image(path: Path, target_size: int | None = None) -> Image.Image:
    """Decode an image as RGB with its EXIF orientation applied (the shared decoder, ``read_rgb``).

    A JPEG at least twice ``target_size`` on its short side is decoded at 1/2, 1/4 or
    1/8 scale (``Image.draft``), never below ``target_size``: about twice as fast and,
    as the transforms shrink it to ``target_size`` anyway, nothing is lost.
    ``ImageLoadError`` (one line) when it cannot be decoded.
    """
    return read_rgb(path, target_size)


def decode_size(image_size: int, augmentation: Augmentation, train: bool) -> int:
    """Smallest short side to decode at so that the transforms never upsample a drafted image."""
    if train and augmentation != "none":
        return math.ceil(image_size / math.sqrt(MIN_CROP_SCALE * 3 / 4))  # smallest RandomResizedCrop side
    return image_size


def build_transforms(image_size: int, augmentation: Augmentation, train: bool, spec: InputSpec | None = None,
                     normalize: bool = True) -> v2.Compose:
    """Image -> normalised float tensor (3, size, size); train presets: none, light, strong.

    ``spec`` gives the weights' normalisation and resize interpolation (ImageNet's
    statistics and bilinear without one). Crops are square, so evaluation resizes to
    ``(size, size)`` (nothing cut off).
    ``light``: random resized crop (60-100 % of the area), flip, mild colour jitter;
    ``strong``: also TrivialAugmentWide and random erasing.
    ``normalize=False`` (not with ``strong``, whose erasing works on normalised values): stop at
    the uint8 tensor, for ``BatchNormalize`` to finish the whole batch at once.
    """
    if augmentation not in ("none", "light", "strong"):
        raise UserError(f"augmentation: unknown preset {augmentation!r} (none, light, strong)")
    spec = spec or InputSpec(image_size)
    interpolation = v2.InterpolationMode(spec.interpolation)
    if not train or augmentation == "none":
        geometry: list[v2.Transform] = [v2.Resize((image_size, image_size), interpolation=interpolation, antialias=True)]
    else:
        geometry = [
            v2.RandomResizedCrop(image_size, scale=(MIN_CROP_SCALE, 1.0), interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
        if augmentation == "strong":
            geometry.append(v2.TrivialAugmentWide())
    erasing = [v2.RandomErasing(p=0.25)] if train and augmentation == "strong" else []
    if not normalize:
        if erasing:
            raise ValueError("random erasing needs per-image normalisation (normalize=True)")
        return v2.Compose([*geometry, v2.ToImage()])
    tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(geometry + tensor + erasing)


@dataclass(frozen=True)
class BatchNormalize:
    """uint8 images (N, 3, H, W) -> normalised float32: the last two steps of ``build_transforms``
    (``ToDtype(float32, scale=True)``, ``Normalize``) with the same arithmetic, so bit-identical, but
    one vectorised op per batch instead of a dispatch per image (~0.2 ms an image at 112 px, a tenth
    of the loader's work on a CPU)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor) -> Tensor:
        mean = torch.as_tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``keys`` (e.g. epoch, index)."""
    state = np.random.SeedSequence([seed % 2**64, *keys]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class CropDataset(Dataset):
    """Samples -> ``(image tensor or None, label, index)``; a file that cannot be read gives None.

    The transform of item ``index`` in ``epoch`` runs under its own torch seed (inside
    ``fork_rng``, so the caller's random state is untouched): the same item always gives
    the same tensor, whichever worker makes it and whenever. The epoch lives in shared
    memory, so that persistent loader workers (started once, not every epoch) see
    ``set_epoch`` too.
    """

    def __init__(self, samples: Sequence[Sample], transform: v2.Transform, seed: int,
                 decode_size: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.decode_size = decode_size
        self._epoch = multiprocessing.RawValue("q", 0)  # shared with the loader's worker processes

    @property
    def epoch(self) -> int:
        """The epoch whose augmentation randomness is used."""
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentation randomness of ``epoch`` from now on (in every worker: a loader sets
        it before it starts the epoch's iterator, which is what hands workers their indices)."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        """The file behind item ``index`` (for the one warning about a skipped image)."""
        return str(self.samples[index].path)

    def read(self, index: int) -> Image.Image | Tensor:
        """Decode item ``index``: accimage when torchvision's backend says so, else PIL (``load_image``).

        The two do not give equal pixels: accimage applies no EXIF rotation (a rotated photo arrives
        sideways) and never decodes at reduced scale (``Image.draft``), so the resized image differs
        slightly. Train and predict with the same backend.
        """
        path = self.samples[index].path
        return load_accimage(path) if use_accimage() else load_image(path, self.decode_size)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, int]:
        label = self.samples[index].label
        try:
            image = self.read(index)
        except OSError:
            return None, label, index
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a seed for CUDA, MTIA and
            # XPU, each with a formatted stack trace (~0.1 ms an image) while they are not initialised
            torch.default_generator.manual_seed(derived_seed(self.seed, self.epoch, index))
            tensor = self.transform(image)
        return tensor.as_subclass(Tensor), label, index


@dataclass
class Batch:
    """A collated batch; ``skipped`` lists the dataset indices whose image could not be read."""

    images: Tensor
    labels: Tensor
    indices: Tensor
    skipped: list[int]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def pin_memory(self) -> Batch:
        """Pinned copies of the tensors (called by the DataLoader when ``pin_memory=True``)."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.skipped)


def collate_skip_none(items: Sequence[tuple[Tensor | None, int, int]], finish: BatchNormalize | None = None) -> Batch:
    """Stack the readable items; list the unreadable ones in ``skipped`` (a batch may end up empty).
    ``finish``: normalise the stacked uint8 images (see ``BatchNormalize``)."""
    kept = [item for item in items if item[0] is not None]
    skipped = [index for image, _, index in items if image is None]
    images = torch.stack([image for image, _, _ in kept if image is not None]) if kept else torch.empty(0)
    if finish is not None and kept:
        images = finish(images)
    labels = torch.tensor([label for _, label, _ in kept], dtype=torch.int64)
    indices = torch.tensor([index for _, _, index in kept], dtype=torch.int64)
    return Batch(images, labels, indices, skipped)


def check_skipped_fraction(skipped: int, total: int, max_fraction: float, what: str, first: Path | str) -> None:
    """Skipping a few unreadable images is right; skipping all of them, or more than ``max_fraction``, is an error
    (a mistyped ``crops_dir`` trained on nothing, "diverged" and exited 0)."""
    if total and (skipped == total or skipped > max_fraction * total):
        raise DataError(f"{what}: {skipped} of {total} images missing or unreadable, more than max_skipped_fraction "
                        f"({max_fraction:g}); first: {first}")


def check_images_exist(samples: Sequence[Sample], max_fraction: float, what: str) -> None:
    """Stat every image up front, so that a wrong folder is one line before epoch 1 (and before any checkpoint)."""
    missing = [sample.path for sample in samples if not os.path.isfile(sample.path)]
    if missing:
        check_skipped_fraction(len(missing), len(samples), max_fraction, f"{what} (is the folder right?)", missing[0])


class SkippedImages:
    """Warns once per unreadable file (in the main process, from ``Batch.skipped``) and counts them; more than
    ``max_fraction`` of the dataset is a ``DataError`` (``check_skipped_fraction``)."""

    def __init__(self, dataset: CropDataset, max_fraction: float = 1.0, what: str = "images") -> None:
        self.dataset = dataset
        self.seen: set[int] = set()
        self.max_fraction = max_fraction
        self.what = what

    def record(self, indices: Sequence[int]) -> None:
        """Warn about each index not seen before; stop the run when too many are unreadable."""
        for index in indices:
            if index not in self.seen:
                self.seen.add(index)
                path = Path(self.dataset.describe(index))
                reason = "unreadable image" if path.exists() else "file not found"
                log.warning("skipped %s (%s); training goes on without it", path, reason)
                check_skipped_fraction(len(self.seen), len(self.dataset), self.max_fraction, self.what, path)

    def __len__(self) -> int:
        return len(self.seen)


# ---------------------------------------------------------------- balancing and sampling


def label_weights(labels: Sequence[int] | np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """MegaDetector's per-sample weights: ``w_i <- w_i * (n / c) / sum_{label_j = label_i} w_j``.

    Each of the ``c`` labels present then carries the same total weight ``n / c``, so a
    weighted sampler draws every class equally often.
    """
    labels = np.asarray(labels, dtype=np.int64)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(labels) == 0:
        return w
    present, inverse = np.unique(labels, return_inverse=True)
    per_label = np.bincount(inverse, weights=w, minlength=len(present))
    return w * (len(labels) / len(present)) / per_label[inverse]


def class_weights_for_loss(labels: Sequence[int], num_classes: int) -> Tensor:
    """Inverse class frequency, normalised to mean 1 over the classes present (absent classes: 1)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes].astype(np.float64)
    weights = np.ones(num_classes)
    present = counts > 0
    if present.any():
        inverse = 1.0 / counts[present]
        weights[present] = inverse / inverse.mean()
    return torch.tensor(weights, dtype=torch.float32)


class EpochSampler(Sampler[int]):
    """Dataset indices for one epoch, a pure function of ``(seed, epoch)``, sharded for DDP.

    ``shuffle``: a permutation; ``weights``: ``n`` draws with replacement; else in order.
    Like ``DistributedSampler``, the list is padded (by repeating its start) to a multiple
    of ``world_size`` and rank ``r`` takes ``[r::world_size]``; ``pad=False`` leaves
    ranks uneven (exact evaluation). ``set_start(k)`` skips this rank's first ``k``
    indices, to resume mid-epoch; ``set_epoch`` resets it to 0.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, weights: Sequence[float] | np.ndarray | None = None,
                 rank: int = 0, world_size: int = 1, pad: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if weights is not None and len(weights) != n:
            raise ValueError(f"{len(weights)} weights for {n} samples")
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch``, from its beginning."""
        self.epoch = epoch
        self.start = 0

    def set_start(self, batch_offset_samples: int) -> None:
        """Skip the first ``batch_offset_samples`` indices of this rank (already trained on)."""
        if not 0 <= batch_offset_samples <= self.rank_size():
            raise ValueError(f"start {batch_offset_samples} outside 0..{self.rank_size()}")
        self.start = batch_offset_samples

    def epoch_order(self) -> Tensor:
        """All ranks' indices of this epoch, before padding."""
        if self.n == 0:
            return torch.zeros(0, dtype=torch.int64)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        if self.shuffle:
            return torch.randperm(self.n, generator=generator)
        return torch.arange(self.n)

    def padded_size(self) -> int:
        """Length of the epoch's list after padding to a multiple of ``world_size``."""
        return math.ceil(self.n / self.world_size) * self.world_size if self.pad else self.n

    def rank_size(self) -> int:
        """Indices this rank gets in a whole epoch."""
        return len(range(self.rank, self.padded_size(), self.world_size))

    def rank_indices(self) -> list[int]:
        """This rank's indices of the epoch, from ``start``."""
        order = self.epoch_order()
        extra = self.padded_size() - self.n
        if extra and self.n:
            order = torch.cat([order, order.repeat(math.ceil(extra / self.n))[:extra]])
        return order[self.rank::self.world_size][self.start:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices())

    def __len__(self) -> int:
        return self.rank_size() - self.start


# ---------------------------------------------------------------- loaders


WORKER_NICENESS = 10  # loader workers feeding a CPU model yield the cores to its compute threads


def lower_worker_priority(worker_id: int) -> None:
    """``worker_init_fn`` for a model computing on the CPU: the workers share its cores, and a
    compute thread they push off a core stalls every parallel op of the step; at lower priority
    they decode in the gaps instead (POSIX; a no-op where ``os.nice`` does not exist)."""
    if hasattr(os, "nice"):
        os.nice(WORKER_NICENESS)


def resolved_input_spec(config: ExperimentConfig) -> InputSpec:
    """The input size and statistics of a config that ``models.resolve_inputs`` resolved, read as they are: that is the
    one place that decides them (a training run, with its checkpoint's; the backbone embeddings, with the weights')."""
    if config.image_size is None or config.mean is None or config.std is None or config.interpolation is None:
        raise ValueError("the config's image_size, mean, std and interpolation are not resolved: pass it through "
                         "training.models.resolve_inputs first")
    return InputSpec(config.image_size, config.mean, config.std, config.interpolation)


def build_loader(config: ExperimentConfig, samples: Sequence[Sample], train: bool, rank: int = 0,
                 world_size: int = 1, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader of ``Batch``es: shuffled (or label-balanced) for training, in order otherwise.

    Training shards are padded like ``DistributedSampler``; evaluation shards are not, so
    every sample is scored exactly once. ``pin_memory`` defaults to "CUDA is used". ``config``'s
    input size and statistics are read as they are: ``models.resolve_inputs`` decides them first.
    """
    spec = resolved_input_spec(config)
    per_batch = not (train and config.augmentation == "strong")  # erasing needs normalised images
    transform = build_transforms(spec.size, config.augmentation, train, spec, normalize=not per_batch)
    dataset = CropDataset(samples, transform, config.seed, decode_size(spec.size, config.augmentation, train))
    finish = BatchNormalize(tuple(spec.mean), tuple(spec.std)) if per_batch else None
    weights = label_weights([s.label for s in samples]) if train and config.balancing == "sampler" else None
    sampler = EpochSampler(len(samples), shuffle=train, seed=config.seed, weights=weights, rank=rank,
                           world_size=world_size, pad=train)
    uses_cuda = torch.cuda.is_available() and str(config.device) != "cpu"
    if pin_memory is None:
        pin_memory = uses_cuda
    # a last training batch of one sample is dropped: batch norm cannot train on one (the shuffle drops another each epoch)
    lone_last = train and sampler.rank_size() > 1 and sampler.rank_size() % config.batch_size == 1
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=functools.partial(collate_skip_none, finish=finish),
        pin_memory=pin_memory,
        drop_last=lone_last,
        persistent_workers=config.num_workers > 0,  # workers (and their imports) start once, not every epoch
        worker_init_fn=None if uses_cuda else lower_worker_priority,
        generator=torch.Generator().manual_seed(config.seed % 2**63),  # leaves the global torch RNG alone
    )


def set_loader_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Point a loader from ``build_loader`` at ``epoch`` (order and augmentation), skipping ``start`` samples."""
    dataset: Any = loader.dataset  # build_loader's CropDataset and sampler
    sampler: Any = loader.sampler
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    sampler.set_start(start)
