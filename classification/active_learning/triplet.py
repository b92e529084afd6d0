"""Norouzzadeh et al.'s (2021) models: a CNN embedding trained with triplet loss, and a small MLP on its embeddings.

The embedding network is any torchvision/timm backbone whose classification head is
replaced by a linear projection to ``embedding_dim``, with L2-normalised output (so
distances lie in [0, 2]). It trains on class-balanced P x K batches
(``PKBatchSampler``) with an online triplet loss over the batch's distance matrix:
``random`` mining (one random valid triplet per anchor, as ``camera_trap_al``'s
``RandomNegativeTripletSelector``) or ``semi_hard`` (FaceNet). ``MLPClassifier`` is
the classifier trained on the embeddings of the labelled images each round.

Determinism: batch order, triplet choice and MLP shuffling use seeded
``torch.Generator``s; weight initialisation and dropout run inside ``seeded``, which
forks the CPU random state, so the caller's random state is untouched and the same
seed gives the same result on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from classification.data.samples import Sample
from classification.errors import UserError
from classification.training.data import (
    Augmentation,
    CropDataset,
    build_transforms,
    collate_skip_none,
    decode_size,
    derived_seed,
)
from classification.training.inference import EMBEDDINGS, default_options, run_inference
from classification.training.models import build_model, input_spec

log = logging.getLogger(__name__)

MINING = ("random", "semi_hard")
DEFAULT_MARGIN = 1.0  # camera_trap_al's default (embeddings are unit vectors: distances in [0, 2])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under torch seed ``seed`` (CPU, and CUDA for dropout on a GPU), restoring the caller's random
    state afterwards (CUDA's too once CUDA is initialised; before that, only the seed CUDA would start from)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        torch.manual_seed(seed % 2**63)
        yield


# ---------------------------------------------------------------- the embedding network


class EmbeddingNetwork(nn.Module):
    """A backbone whose head is a linear projection to ``embedding_dim``; outputs unit-length embeddings.

    ``build_model(architecture, num_classes=embedding_dim, ...)`` makes the head the
    projection, so a ``weights_file`` from a classifier loads everything but the head.
    """

    def __init__(self, architecture: str = "resnet18", embedding_dim: int = 128, pretrained: bool = True,
                 weights_file: Path | None = None, pretrained_source: str = "library") -> None:
        super().__init__()
        if embedding_dim < 1:
            raise UserError(f"embedding_dim: must be at least 1, got {embedding_dim}")
        self.architecture = architecture
        self.embedding_dim = embedding_dim
        self.backbone = build_model(architecture, embedding_dim, pretrained, weights_file, pretrained_source)
        # the weights' normalisation and interpolation (those of the packaged weights when they are used)
        self.input_spec = input_spec(architecture, pretrained_source if pretrained else "library")

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> L2-normalised embeddings (B, embedding_dim)."""
        return F.normalize(self.backbone(images), dim=1)


# ---------------------------------------------------------------- class-balanced batches


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P classes x K images each; a pure function of ``(seed, epoch)``.

    Each batch draws P distinct classes at random (all classes when there are fewer
    than P) and K images of each, without replacement, or with replacement for a class
    that has fewer than K images. An epoch has ``len(labels) // (P * K)`` batches (at
    least one) unless ``batches_per_epoch`` is given.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, classes_per_batch: int, images_per_class: int,
                 seed: int, batches_per_epoch: int | None = None) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) == 0:
            raise UserError("PK batches: no labelled images to sample from")
        if classes_per_batch < 1 or images_per_class < 1:
            raise UserError(f"PK batches: classes_per_batch and images_per_class must be at least 1, "
                            f"got {classes_per_batch} and {images_per_class}")
        self.members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        self.classes_per_batch = min(classes_per_batch, len(self.members))
        self.images_per_class = images_per_class
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch or max(1, len(labels) // (self.classes_per_batch * images_per_class))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the batches of ``epoch``."""
        self.epoch = epoch

    def draw_class(self, members: np.ndarray, generator: torch.Generator) -> list[int]:
        """K indices of one class: a random subset, or draws with replacement when the class is small."""
        k = self.images_per_class
        if len(members) >= k:
            picks = torch.randperm(len(members), generator=generator)[:k]
        else:
            picks = torch.randint(len(members), (k,), generator=generator)
        return members[picks.numpy()].tolist()

    def epoch_batches(self) -> list[list[int]]:
        """All batches of the current epoch."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        batches = []
        for _ in range(self.batches_per_epoch):
            classes = torch.randperm(len(self.members), generator=generator)[:self.classes_per_batch]
            batches.append([index for c in classes.tolist() for index in self.draw_class(self.members[c], generator)])
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch_batches())

    def __len__(self) -> int:
        return self.batches_per_epoch


# ---------------------------------------------------------------- triplet loss


@dataclass(frozen=True)
class TripletLoss:
    """The mean hinge loss over the mined triplets, how many there were, and how many had a loss > 0."""

    loss: Tensor
    triplets: int
    active: int


def pairwise_distances(embeddings: Tensor) -> Tensor:
    """Euclidean distances (B, B) between all rows; a tiny epsilon keeps the gradient finite at 0."""
    difference = embeddings[:, None, :] - embeddings[None, :, :]
    return (difference.pow(2).sum(-1) + 1e-12).sqrt()


def mine_triplets(distances: Tensor, labels: Tensor, mining: str, margin: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """``(T, 3)`` indices ``(anchor, positive, negative)`` chosen from a batch's distance matrix.

    ``random``: per anchor with a positive and a negative, one of each at random.
    ``semi_hard`` (FaceNet): every anchor-positive pair, with the closest negative among
    those with ``d_ap < d_an < d_ap + margin``; where there is none, the hardest
    (closest) negative.
    """
    if mining not in MINING:
        raise UserError(f"mining: unknown {mining!r} (choose from {', '.join(MINING)})")
    distances = distances.detach()
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    anchors = torch.nonzero(positive.any(1) & negative.any(1)).flatten()
    if len(anchors) == 0:
        return torch.zeros((0, 3), dtype=torch.int64, device=labels.device)
    if mining == "random":
        positives = torch.multinomial(positive[anchors].double().cpu(), 1, generator=generator).squeeze(1)
        negatives = torch.multinomial(negative[anchors].double().cpu(), 1, generator=generator).squeeze(1)
        return torch.stack([anchors.cpu(), positives, negatives], dim=1).to(labels.device)
    pairs = torch.nonzero(positive[anchors])
    a, p = anchors[pairs[:, 0]], pairs[:, 1]
    d_ap = distances[a, p][:, None]
    d_an = distances[a]
    is_negative = negative[a]
    semi_hard = is_negative & (d_an > d_ap) & (d_an < d_ap + margin)
    inf = torch.tensor(float("inf"), device=distances.device)
    closest_semi_hard = torch.where(semi_hard, d_an, inf).argmin(1)
    hardest = torch.where(is_negative, d_an, inf).argmin(1)
    n = torch.where(semi_hard.any(1), closest_semi_hard, hardest)
    return torch.stack([a, p, n], dim=1)


def triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = DEFAULT_MARGIN, mining: str = "semi_hard",
                 generator: torch.Generator | None = None) -> TripletLoss:
    """Mean of ``max(0, d_ap - d_an + margin)`` over the triplets mined from the batch (0 when there are none)."""
    distances = pairwise_distances(embeddings)
    triplets = mine_triplets(distances, labels, mining, margin, generator)
    if len(triplets) == 0:
        return TripletLoss(embeddings.sum() * 0.0, 0, 0)
    a, p, n = triplets.unbind(1)
    hinge = F.relu(distances[a, p] - distances[a, n] + margin)
    return TripletLoss(hinge.mean(), len(triplets), int((hinge > 0).sum()))


# ---------------------------------------------------------------- training and embedding


@dataclass(frozen=True)
class EmbeddingTraining:
    """What ``train_embedding`` did: mean loss and active triplets per epoch, and the unreadable files."""

    epoch_losses: tuple[float, ...]
    epoch_active: tuple[int, ...]
    skipped: tuple[Path, ...]


def train_embedding(network: EmbeddingNetwork, samples: Sequence[Sample], epochs: int, *, image_size: int = 224,
                    classes_per_batch: int = 16, images_per_class: int = 4, margin: float = DEFAULT_MARGIN,
                    mining: str = "semi_hard", learning_rate: float = 1e-3, weight_decay: float = 5e-4,
                    augmentation: Augmentation = "light", seed: int = 0, device: str | torch.device = "cpu",
                    num_workers: int = 0) -> EmbeddingTraining:
    """Tune ``network`` in place with triplet loss on P x K batches of ``samples`` (Adam, as camera_trap_al).

    Unreadable images are left out of their batch and reported once each.
    """
    if mining not in MINING:
        raise UserError(f"mining: unknown {mining!r} (choose from {', '.join(MINING)})")
    dataset = CropDataset(samples, build_transforms(image_size, augmentation, True, getattr(network, "input_spec", None)), seed,
                          decode_size(image_size, augmentation, train=True))
    sampler = PKBatchSampler([s.label for s in samples], classes_per_batch, images_per_class, seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_skip_none, num_workers=num_workers)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(derived_seed(seed, 1))
    network.to(device).train()
    losses, active = [], []
    skipped: dict[Path, None] = {}
    with seeded(derived_seed(seed, 2)):
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            total, count, epoch_active = 0.0, 0, 0
            for batch in loader:
                skipped.update({samples[i].path: None for i in batch.skipped})
                if len(batch) < 2:
                    continue
                result = triplet_loss(network(batch.images.to(device)), batch.labels.to(device), margin, mining, generator)
                optimizer.zero_grad(set_to_none=True)
                result.loss.backward()
                optimizer.step()
                total, count, epoch_active = total + result.loss.item(), count + 1, epoch_active + result.active
            losses.append(total / max(count, 1))
            active.append(epoch_active)
            log.info("embedding epoch %d: triplet loss %.4f, %d active triplets", epoch, losses[-1], epoch_active)
    for path in skipped:
        log.warning("skipped %s (unreadable image); embedding training goes on without it", path)
    return EmbeddingTraining(tuple(losses), tuple(active), tuple(skipped))


def network_embeddings(network: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The embedding network's output (unit vectors) for one batch: the ``Compute`` of ``embed``."""
    return {EMBEDDINGS: network(images).float()}


@dataclass(frozen=True)
class EmbeddedImages:
    """Embeddings (n, d) of ``paths`` in order; rows of unreadable images are zeros and ``readable`` is False."""

    paths: tuple[Path, ...]
    vectors: np.ndarray
    readable: np.ndarray

    @property
    def skipped(self) -> tuple[Path, ...]:
        """The files that could not be read."""
        return tuple(path for path, ok in zip(self.paths, self.readable) if not ok)


def embed(network: EmbeddingNetwork, paths: Sequence[Path], *, image_size: int = 224, batch_size: int = 64,
          device: str | torch.device = "cpu", num_workers: int = 0) -> EmbeddedImages:
    """Embed images in batches through the one inference path (eval mode, ``torch.inference_mode``, channels_last
    on CUDA); unreadable ones are skipped and reported."""
    samples = [Sample(Path(path), 0, "", "") for path in paths]
    dataset = CropDataset(samples, build_transforms(image_size, "none", False, getattr(network, "input_spec", None)), 0, image_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_none,
                        num_workers=num_workers)
    computed = run_inference(network, loader, network_embeddings, (EMBEDDINGS,), default_options(torch.device(device)), "embed")
    vectors = np.zeros((len(samples), network.embedding_dim), dtype=np.float32)
    readable = np.ones(len(samples), dtype=bool)
    readable[computed.skipped] = False
    if len(computed):
        vectors[computed.indices] = computed.outputs[EMBEDDINGS]
    result = EmbeddedImages(tuple(s.path for s in samples), vectors, readable)
    for path in result.skipped:
        log.warning("skipped %s (%s)", path, "unreadable image" if path.exists() else "file not found")
    return result


# ---------------------------------------------------------------- the classifier on embeddings


class MLPClassifier(nn.Module):
    """Linear - ReLU - Dropout - Linear: the per-round classifier on embeddings."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, num_classes))

    def forward(self, embeddings: Tensor) -> Tensor:
        """Embeddings (B, d) -> logits (B, num_classes)."""
        return self.layers(embeddings)


def train_mlp(embeddings: np.ndarray, labels: Sequence[int] | np.ndarray, num_classes: int, *, hidden: int = 256,
              dropout: float = 0.25, epochs: int = 100, batch_size: int = 64, learning_rate: float = 1e-3,
              weight_decay: float = 1e-4, seed: int = 0) -> MLPClassifier:
    """A new ``MLPClassifier`` trained from scratch (Adam, cross-entropy, shuffled mini-batches) on CPU."""
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(x) == 0 or len(x) != len(y):
        raise UserError(f"MLP: need as many labels as embeddings (and at least one), got {len(y)} and {len(x)}")
    generator = torch.Generator().manual_seed(derived_seed(seed, 3))
    with seeded(derived_seed(seed, 4)):
        mlp = MLPClassifier(x.shape[1], num_classes, hidden, dropout)
        optimizer = torch.optim.Adam(mlp.parameters(), lr=learning_rate, weight_decay=weight_decay)
        mlp.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                loss = F.cross_entropy(mlp(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return mlp.eval()


def predict_proba(mlp: MLPClassifier, embeddings: np.ndarray) -> np.ndarray:
    """Softmax probabilities (n, num_classes) as float64."""
    mlp.eval()
    with torch.inference_mode():
        logits = mlp(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)))
    return torch.softmax(logits.double(), dim=1).numpy()
