"""MetricAccumulator: exact values on a hand-computed example, scikit-learn as the reference on
random data (and on the example), batch-size independence, and the DDP state round trip / merge."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from classification.training.metrics import CALIBRATION_BINS, MetricAccumulator, scalar_metrics

NAMES = ["a", "b", "c", "d", "e"]
# (true label, softmax probabilities); confidences avoid the bin edges i/15.
EXAMPLE = [
    (0, [0.70, 0.10, 0.08, 0.07, 0.05]),  # correct, conf .70
    (0, [0.30, 0.50, 0.10, 0.06, 0.04]),  # predicts b, top-3 hit
    (1, [0.02, 0.90, 0.03, 0.04, 0.01]),  # correct, conf .90
    (2, [0.45, 0.10, 0.25, 0.15, 0.05]),  # predicts a, top-3 hit
    (2, [0.55, 0.25, 0.04, 0.15, 0.01]),  # predicts a, top-3 miss
    (3, [0.05, 0.10, 0.05, 0.75, 0.05]),  # correct, conf .75
    (3, [0.15, 0.20, 0.10, 0.20, 0.35]),  # predicts e (a class with no samples)
]


def example_batch() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Logits whose softmax is exactly the probabilities above, targets, and the NLL sum."""
    logits = torch.tensor([p for _, p in EXAMPLE], dtype=torch.float64).log()
    targets = torch.tensor([t for t, _ in EXAMPLE])
    loss_sum = -sum(math.log(p[t]) for t, p in EXAMPLE)
    return logits, targets, loss_sum


def test_hand_computed_example() -> None:
    logits, targets, loss_sum = example_batch()
    accumulator = MetricAccumulator(5)
    accumulator.update(logits, targets, loss_sum)
    result = accumulator.compute(NAMES)

    assert result["confusion"] == [
        [1, 1, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [2, 0, 0, 0, 0],
        [0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0],
    ]
    assert result["loss"] == pytest.approx(loss_sum / 7)
    assert result["top1"] == pytest.approx(3 / 7)
    assert result["top3"] == pytest.approx(6 / 7)
    expected_per_class = {
        "a": (1 / 3, 1 / 2, 0.4, 2),
        "b": (1 / 2, 1.0, 2 / 3, 1),
        "c": (0.0, 0.0, 0.0, 2),
        "d": (1.0, 1 / 2, 2 / 3, 2),
        "e": (0.0, 0.0, 0.0, 0),  # predicted once, never true: all 0 (undefined recall)
    }
    for name, (precision, recall, f1, support) in expected_per_class.items():
        figures = result["per_class"][name]
        assert figures["precision"] == pytest.approx(precision)
        assert figures["recall"] == pytest.approx(recall)
        assert figures["f1"] == pytest.approx(f1)
        assert figures["support"] == support
    # Macro over the four classes with support > 0; weighted by support (2, 1, 2, 2, 0).
    assert result["macro_precision"] == pytest.approx(11 / 24)
    assert result["macro_recall"] == pytest.approx(1 / 2)
    assert result["macro_f1"] == pytest.approx(13 / 30)
    assert result["weighted_precision"] == pytest.approx(19 / 42)
    assert result["weighted_recall"] == pytest.approx(3 / 7)
    assert result["weighted_f1"] == pytest.approx(0.4)
    # One sample per bin: |accuracy - confidence| = .3 .5 .1 .45 .55 .25 .35
    assert result["ece"] == pytest.approx(2.5 / 7)
    reference = reference_metrics(EXAMPLE, loss_sum, 5)  # the hand-computed figures agree with scikit-learn's
    assert result["confusion"] == reference["confusion"]
    for key in ["top1", "top3", "macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall", "weighted_f1"]:
        assert result[key] == pytest.approx(reference[key]), key

    bins = accumulator.calibration_bins()
    assert len(bins) == CALIBRATION_BINS
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0]
    assert bins[10]["confidence"] == pytest.approx(0.70) and bins[10]["accuracy"] == 1.0
    assert bins[7]["confidence"] == pytest.approx(0.50) and bins[7]["accuracy"] == 0.0
    assert bins[0] == {"lower": 0.0, "upper": 1 / 15, "count": 0, "confidence": 0.0, "accuracy": 0.0}


def test_names_from_label_index_mapping_and_scalars() -> None:
    logits, targets, loss_sum = example_batch()
    accumulator = MetricAccumulator(5)
    accumulator.update(logits, targets, loss_sum)
    result = accumulator.compute(dict(enumerate(NAMES)))
    assert list(result["per_class"]) == NAMES
    flat = scalar_metrics(result, prefix="val_")
    assert flat["val_top1"] == pytest.approx(3 / 7)
    assert flat["val_macro_recall"] == pytest.approx(0.5)
    assert flat["val_recall_b"] == 1.0 and flat["val_precision_a"] == pytest.approx(1 / 3)
    assert "val_confusion" not in flat and "val_per_class" not in flat


def reference_metrics(rows: list[tuple[int, list[float]]], loss_sum: float, c: int) -> dict:
    """Reference metrics from softmax probabilities: scikit-learn for accuracy, top-k, precision/recall/F1 and the
    confusion matrix; expected calibration error (not in scikit-learn) by hand."""
    n = len(rows)
    labels = list(range(c))
    y_true = np.array([target for target, _ in rows])
    y_score = np.array([probabilities for _, probabilities in rows])
    y_pred = y_score.argmax(axis=1)
    k = min(3, c)
    top3 = 1.0 if k == c else top_k_accuracy_score(y_true, y_score, k=k, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = [label for label in labels if support[label] > 0]
    result = {
        "loss": loss_sum / n,
        "top1": accuracy_score(y_true, y_pred),
        "top3": top3,
        "ece": hand_computed_ece(rows),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    for average in ("macro", "weighted"):  # macro over the classes with samples, as the library reports it
        figures = precision_recall_fscore_support(y_true, y_pred, labels=present if average == "macro" else labels,
                                                  average=average, zero_division=0)
        result |= {f"{average}_{name}": float(value) for name, value in zip(["precision", "recall", "f1"], figures[:3])}
    result["per_class"] = {
        str(k): {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]), "support": int(support[k])}
        for k in labels
    }
    return result


def hand_computed_ece(rows: list[tuple[int, list[float]]]) -> float:
    """Expected calibration error over CALIBRATION_BINS equal-width confidence bins, in plain Python."""
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(CALIBRATION_BINS)]
    for target, probabilities in rows:
        prediction = max(range(len(probabilities)), key=lambda j: probabilities[j])
        confidence = probabilities[prediction]
        for b in range(CALIBRATION_BINS):
            if b / CALIBRATION_BINS < confidence <= (b + 1) / CALIBRATION_BINS:
                bins[b].append((confidence, prediction == target))
    n = len(rows)
    return sum(abs(sum(ok for _, ok in b) / len(b) - sum(p for p, _ in b) / len(b)) * len(b) / n for b in bins if b)


def random_data(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits, targets that never use the last class, and per-sample losses."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64) * 2
    targets = torch.randint(0, c - 1, (n,), generator=generator)
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return logits, targets, losses


@pytest.mark.parametrize("c", [2, 6])
def test_matches_scikit_learn_reference(c: int) -> None:
    logits, targets, losses = random_data(301, c, seed=c)
    accumulator = MetricAccumulator(c)
    accumulator.update(logits, targets, losses.sum())
    result = accumulator.compute()

    rows = [(int(t), torch.softmax(row, 0).tolist()) for row, t in zip(logits, targets, strict=True)]
    expected = reference_metrics(rows, float(losses.sum()), c)
    assert result["confusion"] == expected["confusion"]
    assert result["per_class"] == {
        name: {key: pytest.approx(value) for key, value in figures.items()}
        for name, figures in expected["per_class"].items()
    }
    averages = [f"{a}_{m}" for a in ("macro", "weighted") for m in ("precision", "recall", "f1")]
    for key in ["loss", "top1", "top3", "ece", *averages]:
        assert result[key] == pytest.approx(expected[key], rel=1e-12), key
    if c == 2:
        assert result["top3"] == 1.0  # k = min(3, C)


def accumulate(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, batches: int) -> MetricAccumulator:
    """Feed the data in ``batches`` uneven chunks."""
    accumulator = MetricAccumulator(logits.shape[1])
    for chunk in torch.tensor_split(torch.arange(len(targets)), batches):
        accumulator.update(logits[chunk], targets[chunk], losses[chunk].sum())
    return accumulator


def assert_same_results(left: dict, right: dict) -> None:
    """Counts must be identical; float sums may differ only by summation order."""
    assert left["confusion"] == right["confusion"]
    assert left.keys() == right.keys()
    for key, value in left.items():
        if isinstance(value, float):
            assert value == pytest.approx(right[key], rel=1e-12, abs=1e-15), key
    assert left["per_class"] == right["per_class"]


def test_batch_size_independence() -> None:
    logits, targets, losses = random_data(100, 5, seed=3)
    whole = accumulate(logits, targets, losses, 1)
    in_seven = accumulate(logits, targets, losses, 7)
    assert_same_results(whole.compute(), in_seven.compute())
    for left, right in zip(whole.calibration_bins(), in_seven.calibration_bins(), strict=True):
        assert left == pytest.approx(right, rel=1e-12)
    assert whole.num_samples == 100


def test_per_sample_not_per_batch_average() -> None:
    accumulator = MetricAccumulator(2)
    # One batch of 1 sample with loss 4, one batch of 3 samples with loss 0 each.
    accumulator.update(torch.tensor([[5.0, 0.0]]), torch.tensor([1]), 4.0)
    accumulator.update(torch.tensor([[5.0, 0.0]] * 3), torch.tensor([0, 0, 0]), 0.0)
    result = accumulator.compute()
    assert result["loss"] == 1.0  # not (4 + 0) / 2
    assert result["top1"] == 0.75  # not (0 + 1) / 2


def test_state_round_trip_and_merge_equal_single_accumulation() -> None:
    logits, targets, losses = random_data(90, 4, seed=9)
    everything = accumulate(logits, targets, losses, 3)
    first = accumulate(logits[:40], targets[:40], losses[:40], 2)
    second = accumulate(logits[40:], targets[40:], losses[40:], 3)

    merged = MetricAccumulator(4)
    merged.merge(first)
    merged.merge(second)
    assert_same_results(merged.compute(), everything.compute())

    # What DDP does: all_reduce(SUM) the flat states, then load the sum on every rank.
    state = first.state_tensor()
    assert state.dtype == torch.float64 and state.ndim == 1
    assert state.numel() == MetricAccumulator.state_size(4)
    reduced = MetricAccumulator(4)
    reduced.load_state_tensor(state + second.state_tensor())
    assert_same_results(reduced.compute(), everything.compute())

    copy = MetricAccumulator(4)
    copy.load_state_tensor(everything.state_tensor())
    assert torch.equal(copy.state_tensor(), everything.state_tensor())
    everything.state_tensor().zero_()  # a copy: the accumulator is not changed through it
    assert everything.num_samples == 90


def test_empty_and_invalid_input() -> None:
    accumulator = MetricAccumulator(3)
    accumulator.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 0.0)
    result = accumulator.compute(["x", "y", "z"])
    assert math.isnan(result["loss"]) and math.isnan(result["top1"]) and math.isnan(result["ece"])
    assert result["per_class"]["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    with pytest.raises(ValueError, match="shape"):
        accumulator.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="targets"):
        accumulator.update(torch.zeros(2, 3), torch.tensor([0, 3]), 0.0)
    with pytest.raises(ValueError, match="merge"):
        accumulator.merge(MetricAccumulator(4))
    with pytest.raises(ValueError, match="label names"):
        accumulator.compute(["x"])
    accumulator.update(torch.zeros(1, 3), torch.tensor([1]), 1.0)
    accumulator.reset()
    assert accumulator.num_samples == 0


def test_random_batches_with_gpu_style_inputs() -> None:
    """float32 logits and a 0-dim loss tensor (what a training loop has) are accepted."""
    rng = random.Random(0)
    accumulator = MetricAccumulator(3)
    for _ in range(5):
        size = rng.randint(1, 6)
        logits = torch.randn(size, 3, dtype=torch.float32)
        targets = torch.randint(0, 3, (size,))
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        accumulator.update(logits, targets, loss)
    assert 0.0 <= accumulator.compute()["top1"] <= 1.0
