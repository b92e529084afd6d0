"""Training data: samples from real pipeline outputs and image folders, decoding, transforms, sampling, loaders."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from classification.config import ExperimentConfig
from classification.data.clean import CleanOptions, clean_cct
from classification.data.samples import Sample, available_splits, build_samples, load_label_index
from classification.demo import make_demo_dataset
from classification.errors import DataError, UserError
from classification.training.data import (
    Augmentation,
    BatchNormalize,
    CropDataset,
    EpochSampler,
    ImageLoadError,
    SkippedImages,
    build_loader,
    build_transforms,
    check_images_exist,
    class_weights_for_loss,
    collate_skip_none,
    label_weights,
    load_image,
    lower_worker_priority,
    set_loader_epoch,
)
from classification.training.models import resolve_inputs
from classification.training.weights import InputSpec
from tests.helpers.processes import run_entry_point


def config_for(data_root: Path, **overrides: object) -> ExperimentConfig:
    """A small CPU config for ``data_root``."""
    values = {"data_root": data_root, "image_size": 32, "batch_size": 4, "num_workers": 0, "pretrained": False}
    return resolve_inputs(ExperimentConfig(**{**values, **overrides}))  # as a training run does


def write_jpeg(path: Path, size: tuple[int, int], seed: int = 0, fmt: str = "JPEG") -> Path:
    """A noisy real image file (noise so augmentation has something to change)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset folder, crops folder) made by the real pipeline from demo data."""
    root = tmp_path_factory.mktemp("pipeline")
    cct = make_demo_dataset(root / "raw", n_locations=6, sequences_per_location=2, frames_per_sequence=2, seed=0)
    clean_cct(cct, root / "clean_cct.json", CleanOptions(dataset="demo"))
    crop = run_entry_point("utils/crop_detections.py", root / "clean_cct.json", root / "crops",
                           "--images-dir", root / "raw" / "images", "--crop-strategy", "pad")
    assert crop.returncode == 0, crop.stderr
    build = run_entry_point("utils/create_classification_dataset.py", root / "ds", "--mode", "csv", "splits",
                            "--crops-dir", root / "crops", "--cct-json", root / "clean_cct.json",
                            "--val-frac", "0.25", "--test-frac", "0.25", "--candidates", "200", "--seed", "0")
    assert build.returncode == 0, build.stderr
    return root / "ds", root / "crops"


# ---------------------------------------------------------------- samples


def test_build_samples_from_pipeline_dataset(demo_dataset: tuple[Path, Path]) -> None:
    ds, crops = demo_dataset
    config = config_for(ds, crops_dir=crops)
    table = pd.read_csv(ds / "classification_ds.csv", dtype=str, keep_default_na=False)
    label_index = load_label_index(ds)
    assert label_index == {int(k): v for k, v in json.loads((ds / "label_index.json").read_text()).items()}
    splits = json.loads((ds / "splits.json").read_text())
    assert available_splits(config) == ["train", "val", "test"]
    seen = []
    for split in ("train", "val", "test"):
        samples = build_samples(config, split)
        keys = {tuple(pair) for pair in splits[split]}
        assert samples and all((s.dataset, s.location) in keys for s in samples)
        assert all(s.path.is_file() and s.path.is_relative_to(crops) for s in samples)
        seen += samples
    by_path = {str(crops / p): label for p, label in zip(table["path"], table["label"])}
    assert sorted(str(s.path) for s in seen) == sorted(by_path)  # every crop in exactly one split
    assert all(label_index[s.label] == by_path[str(s.path)] for s in seen)


def test_build_samples_errors_name_the_file(demo_dataset: tuple[Path, Path], tmp_path: Path) -> None:
    ds, crops = demo_dataset
    with pytest.raises(UserError, match=r"splits\.json: no split 'valid' \(available: train, val, test\)"):
        build_samples(config_for(ds, crops_dir=crops), "valid")
    broken = tmp_path / "ds"
    shutil.copytree(ds, broken)
    index = json.loads((broken / "label_index.json").read_text())
    removed = index.pop(str(len(index) - 1))
    (broken / "label_index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=rf"classification_ds\.csv: label '{removed}' is not in .*label_index\.json"):
        build_samples(config_for(broken, crops_dir=crops), "train")


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 1)):
        for k, name in enumerate(("owl", "deer")):
            for i in range(n):
                write_jpeg(tmp_path / split / name / f"{i}.JPG", (20, 20), seed=k * 10 + i)
    (tmp_path / "train" / "deer" / "notes.txt").write_text("not an image")
    config = config_for(tmp_path)
    assert load_label_index(tmp_path) == {0: "deer", 1: "owl"}
    train = build_samples(config, "train")
    assert [(s.path.name, s.label) for s in train] == [("0.JPG", 0), ("1.JPG", 0), ("2.JPG", 0),
                                                       ("0.JPG", 1), ("1.JPG", 1), ("2.JPG", 1)]
    assert len(build_samples(config, "val")) == 2
    with pytest.raises(UserError, match=r"no split 'test' in this image folder \(available: train, val\)"):
        build_samples(config, "test")
    write_jpeg(tmp_path / "val" / "fox" / "0.jpg", (20, 20))
    with pytest.raises(DataError, match=r"class 'fox' has no folder in the train split"):
        build_samples(config, "val")


def test_flat_image_folder_is_the_train_split(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "b_cat" / "x.png", (20, 20), fmt="PNG")
    write_jpeg(tmp_path / "a_dog" / "y.jpeg", (20, 20))
    config = config_for(tmp_path)
    assert [(s.path.name, s.label) for s in build_samples(config, "train")] == [("y.jpeg", 0), ("x.png", 1)]
    assert available_splits(config) == ["train"]
    with pytest.raises(UserError, match=r"no split 'val' .*available: train \(the whole folder"):
        build_samples(config, "val")


# ---------------------------------------------------------------- decoding


def test_load_image_drafts_only_when_nothing_is_lost(tmp_path: Path) -> None:
    jpeg = write_jpeg(tmp_path / "big.jpg", (640, 480))
    assert load_image(jpeg).size == (640, 480)
    small = load_image(jpeg, 64)
    assert small.size == (160, 120) and small.mode == "RGB"  # 1/4 scale; 1/8 (80x60) would be below 64
    assert load_image(jpeg, 300).size == (640, 480)  # 1/2 would be 240 < 300: full decode
    png = write_jpeg(tmp_path / "big.png", (640, 480), fmt="PNG")
    assert load_image(png, 64).size == (640, 480)  # draft is JPEG-only


def test_real_problem_files(shared_data: Path) -> None:
    folder = shared_data / "speciesnet_test_data"
    with pytest.raises(ImageLoadError):
        load_image(folder / "african_elephants_truncated_file.jpg", 64)
    reference = np.asarray(load_image(folder / "african_elephants.jpg", 64), dtype=np.float64)
    assert reference.shape == (192, 256, 3)  # 2048x1536 drafted to 1/8, still >= 64
    for name in ("african_elephants_bw.jpg", "african_elephants_cmyk.jpg", "african_elephants_with_exif_orientation.jpg"):
        image = load_image(folder / name, 64)
        assert image.mode == "RGB" and image.size == (256, 192), name  # EXIF file is stored 1536x2048
        assert np.abs(np.asarray(image, dtype=np.float64) - reference).mean() < 25, name  # same picture, upright
    samples = [Sample(folder / name, 0, "", "") for name in
               ("african_elephants_truncated_file.jpg", "african_elephants_cmyk.jpg", "african_elephants_bw.jpg", "gone.jpg")]
    dataset = CropDataset(samples, build_transforms(32, "none", train=False), seed=0, decode_size=32)
    items = [dataset[i] for i in range(len(samples))]
    assert items[0][0] is None and items[3][0] is None
    assert dataset.describe(0) == str(folder / "african_elephants_truncated_file.jpg")
    assert items[1][0] is not None and items[2][0] is not None
    assert items[1][0].shape == items[2][0].shape == (3, 32, 32)
    batch = collate_skip_none(items)
    assert batch.skipped == [0, 3] and batch.indices.tolist() == [1, 2] and batch.images.shape == (2, 3, 32, 32)


def test_skipped_images_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    others = [Sample(tmp_path / f"ok{i}.jpg", 0, "", "") for i in range(38)]  # not read: record() sees indices only
    dataset = CropDataset([Sample(bad, 0, "", ""), Sample(tmp_path / "gone.jpg", 0, "", ""), *others],
                          build_transforms(32, "none", False), seed=0)
    skipped = SkippedImages(dataset, max_fraction=0.05)
    with caplog.at_level("WARNING"):
        skipped.record([0, 1])
        skipped.record([0])
    assert len(skipped) == 2
    assert [r.getMessage() for r in caplog.records] == [f"skipped {bad} (unreadable image); training goes on without it",
                                                        f"skipped {tmp_path / 'gone.jpg'} (file not found); training goes on without it"]


def test_skipped_images_beyond_the_fraction_or_all_of_them_are_an_error(tmp_path: Path) -> None:
    """Skipping every image (a wrong crops_dir) or more than ``max_fraction`` of them stops the run, naming the file."""
    samples = [Sample(tmp_path / f"gone{i}.jpg", 0, "", "") for i in range(10)]
    dataset = CropDataset(samples, build_transforms(32, "none", False), seed=0)
    skipped = SkippedImages(dataset, max_fraction=0.15, what="crops: split 'train'")
    skipped.record([0])  # 1 of 10: fine
    with pytest.raises(DataError, match=r"crops: split 'train': 2 of 10 images missing or unreadable, more than "
                                        r"max_skipped_fraction \(0.15\); first: .*gone1.jpg"):
        skipped.record([1])
    with pytest.raises(DataError, match=r"3 of 3 images"):
        check_images_exist(samples[:3], 1.0, "crops")
    check_images_exist(samples[:0], 0.0, "crops")


# ---------------------------------------------------------------- transforms and determinism


def test_transforms_normalise_and_shape(tmp_path: Path) -> None:
    mean = tuple(round(255 * m) for m in (0.485, 0.456, 0.406))
    image = Image.new("RGB", (50, 50), mean)
    for augmentation in ("none", "light", "strong"):
        for train in (False, True):
            out = build_transforms(24, augmentation, train)(image)
            assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    eval_out = build_transforms(24, "light", False)(image)
    assert eval_out.abs().max() < 0.01  # the ImageNet mean colour normalises to 0


def test_batch_normalisation_equals_per_image_normalisation_bit_for_bit(tmp_path: Path) -> None:
    """The loader leaves ToDtype + Normalize to one op per batch (BatchNormalize): the same floats."""
    samples = [Sample(write_jpeg(tmp_path / f"{i}.jpg", (60 + 7 * i, 48), seed=i), 0, "", "") for i in range(5)]
    spec = InputSpec(32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    cases: tuple[tuple[Augmentation, bool], ...] = (("light", True), ("none", False), ("light", False))
    for augmentation, train in cases:
        whole = CropDataset(samples, build_transforms(32, augmentation, train, spec), seed=3)
        split = CropDataset(samples, build_transforms(32, augmentation, train, spec, normalize=False), seed=3)
        assert image_at(split, 0).dtype == torch.uint8
        finish = BatchNormalize(spec.mean, spec.std)
        expected = collate_skip_none([whole[i] for i in range(5)]).images
        assert torch.equal(collate_skip_none([split[i] for i in range(5)], finish=finish).images, expected)
    with pytest.raises(ValueError, match="erasing"):
        build_transforms(32, "strong", True, spec, normalize=False)


def image_at(dataset: CropDataset, index: int) -> torch.Tensor:
    """The image of item ``index``, which must have been readable."""
    image = dataset[index][0]
    assert image is not None
    return image


def test_items_are_a_pure_function_of_epoch_and_index(tmp_path: Path) -> None:
    samples = [Sample(write_jpeg(tmp_path / f"{i}.jpg", (48, 48), seed=i), i % 2, "", "") for i in range(4)]
    dataset = CropDataset(samples, build_transforms(32, "strong", True), seed=7)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    forward = [image_at(dataset, i) for i in range(4)]
    backward = [image_at(dataset, i) for i in reversed(range(4))][::-1]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    dataset.set_epoch(1)
    assert not any(torch.equal(a, image_at(dataset, i)) for i, a in enumerate(forward))
    dataset.set_epoch(0)
    assert torch.equal(image_at(dataset, 2), forward[2])
    other_seed = CropDataset(samples, build_transforms(32, "strong", True), seed=8)
    assert not torch.equal(image_at(other_seed, 0), forward[0])


def collect(loader: torch.utils.data.DataLoader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(b.images, b.labels, b.indices) for b in loader]


def test_loader_batches_do_not_depend_on_workers_or_resume(demo_dataset: tuple[Path, Path]) -> None:
    ds, crops = demo_dataset
    config = config_for(ds, crops_dir=crops, augmentation="light")
    samples = build_samples(config, "train")
    loaders = {}
    for workers in (0, 2):
        loader = build_loader(config.model_copy(update={"num_workers": workers}), samples, train=True)
        set_loader_epoch(loader, 3)
        loaders[workers] = collect(loader)
    assert len(loaders[0]) == -(-len(samples) // 4)
    for (a, la, ia), (b, lb, ib) in zip(loaders[0], loaders[2]):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ia, ib)
    assert sorted(torch.cat([i for _, _, i in loaders[0]]).tolist()) == list(range(len(samples)))
    resumed = build_loader(config, samples, train=True)
    set_loader_epoch(resumed, 3, start=2 * config.batch_size)  # two batches were trained before the crash
    tail = collect(resumed)
    assert len(tail) == len(loaders[0]) - 2
    assert all(torch.equal(a, b) for (a, _, _), (b, _, _) in zip(tail, loaders[0][2:]))
    set_loader_epoch(resumed, 4)
    assert not torch.equal(collect(resumed)[0][2], loaders[0][0][2])  # a new epoch, a new order


def test_persistent_workers_follow_the_epoch(demo_dataset: tuple[Path, Path]) -> None:
    # Workers start once (persistent_workers) and must still augment epoch 2 as epoch 2.
    ds, crops = demo_dataset
    config = config_for(ds, crops_dir=crops, augmentation="light")
    samples = build_samples(config, "train")
    persistent = build_loader(config.model_copy(update={"num_workers": 2}), samples, train=True)
    in_process = build_loader(config, samples, train=True)
    assert persistent.persistent_workers and not in_process.persistent_workers
    if not torch.cuda.is_available():  # workers feeding a CPU model yield the cores to its compute threads
        assert persistent.worker_init_fn is lower_worker_priority
    pids = []
    for epoch in (1, 2):
        set_loader_epoch(persistent, epoch)
        set_loader_epoch(in_process, epoch)
        batches = collect(persistent)
        assert isinstance(persistent._iterator, _MultiProcessingDataLoaderIter)
        pids.append(tuple(sorted(w.pid for w in persistent._iterator._workers if w.pid is not None)))  # all started
        for (a, la, ia), (b, lb, ib) in zip(batches, collect(in_process), strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ia, ib)
    assert pids[0] == pids[1], "the same worker processes in both epochs"


def test_eval_loader_keeps_order_and_balancing_uses_weights(demo_dataset: tuple[Path, Path]) -> None:
    ds, crops = demo_dataset
    config = config_for(ds, crops_dir=crops, balancing="sampler")
    samples = build_samples(config, "val")
    loader = build_loader(config, samples, train=False)
    assert torch.cat([b.indices for b in loader]).tolist() == list(range(len(samples)))
    assert isinstance(loader.sampler, EpochSampler)
    assert loader.sampler.weights is None and not loader.pin_memory
    train = build_samples(config, "train")
    weighted = build_loader(config, train, train=True)
    expected = label_weights([s.label for s in train])
    assert isinstance(weighted.sampler, EpochSampler) and weighted.sampler.weights is not None
    assert np.allclose(weighted.sampler.weights.numpy(), expected)


# ---------------------------------------------------------------- balancing and sampling


def test_label_weights_megadetector_formula() -> None:
    # n = 6, c = 3: each label's weights sum to n / c = 2
    assert np.allclose(label_weights([0, 0, 0, 1, 2, 2]), [2 / 3, 2 / 3, 2 / 3, 2, 1, 1])
    weights = label_weights([0, 0, 1], weights=[1, 3, 5])  # n / c = 1.5
    assert np.allclose(weights, [1.5 * 1 / 4, 1.5 * 3 / 4, 1.5])
    assert label_weights([]).shape == (0,)


def test_class_weights_for_loss() -> None:
    # inverse counts 1/3, 1 -> mean 2/3 -> 0.5, 1.5; class 2 absent -> 1
    assert torch.allclose(class_weights_for_loss([0, 0, 0, 1], 3), torch.tensor([0.5, 1.5, 1.0]))


def test_epoch_sampler_is_deterministic_and_shards() -> None:
    sampler = EpochSampler(7, shuffle=True, seed=3)
    sampler.set_epoch(5)
    order = list(sampler)
    assert sorted(order) == list(range(7)) and len(sampler) == 7
    again = EpochSampler(7, shuffle=True, seed=3)
    again.set_epoch(5)
    assert list(again) == order
    sampler.set_epoch(6)
    assert list(sampler) != order
    ranks = [EpochSampler(7, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(5)
    assert [len(r) for r in ranks] == [4, 4]
    padded = order + order[:1]
    assert list(ranks[0]) == padded[0::2] and list(ranks[1]) == padded[1::2]
    ranks[1].set_start(3)
    assert list(ranks[1]) == padded[1::2][3:] and len(ranks[1]) == 1
    ranks[1].set_epoch(5)
    assert len(ranks[1]) == 4  # a new epoch starts from its beginning
    unpadded = [EpochSampler(7, shuffle=False, seed=3, rank=r, world_size=2, pad=False) for r in range(2)]
    assert sorted(list(unpadded[0]) + list(unpadded[1])) == list(range(7))
    assert list(EpochSampler(3, shuffle=False, seed=0)) == [0, 1, 2]


def test_weighted_sampler_draws_with_replacement() -> None:
    weights = label_weights([0] * 90 + [1] * 10)
    sampler = EpochSampler(100, shuffle=True, seed=0, weights=weights)
    drawn = np.array(list(sampler))
    assert len(drawn) == 100 and len(set(drawn)) < 100
    assert 30 < (drawn >= 90).sum() < 70  # the rare class is drawn about half the time
    again = EpochSampler(100, shuffle=True, seed=0, weights=weights)
    assert list(again) == drawn.tolist()
    zero = EpochSampler(4, shuffle=True, seed=0, weights=[1, 0, 0, 1])
    assert set(zero) <= {0, 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_on_cuda(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "owl" / "0.jpg", (40, 40))
    config = config_for(tmp_path, device="cuda")
    loader = build_loader(config, build_samples(config, "train"), train=False)
    assert loader.pin_memory
    batch = next(iter(loader))
    assert batch.images.is_pinned() and batch.labels.is_pinned() and batch.skipped == []


def test_the_loader_reads_inputs_that_resolve_inputs_decided(tmp_path: Path) -> None:
    """One place decides the input size and statistics (``resolve_inputs``: the run, with its checkpoint's); the
    loader refuses a config that did not go through it instead of deciding them a second time."""
    unresolved = ExperimentConfig(data_root=tmp_path, image_size=32, pretrained=False)
    with pytest.raises(ValueError, match="not resolved: pass it through training.models.resolve_inputs"):
        build_loader(unresolved, [], train=False)
    resolved = resolve_inputs(unresolved, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"})
    collate = build_loader(resolved, [], train=False).collate_fn
    assert isinstance(collate, functools.partial) and collate.keywords["finish"].mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(("count", "sizes"), [(7, [3, 3]), (8, [3, 3, 2]), (1, [1])])
def test_a_lone_last_training_batch_is_dropped_and_evaluation_keeps_every_sample(tmp_path: Path, count: int, sizes: list[int]) -> None:
    """Batch norm cannot train on one sample ('Expected more than 1 value per channel'): 7 crops in batches of 3 train as 3 + 3."""
    (tmp_path / "crops").mkdir()
    samples = []
    for i in range(count):
        Image.new("RGB", (40, 36), (30 * i % 256, 90, 200)).save(tmp_path / "crops" / f"{i}.jpg")
        samples.append(Sample(tmp_path / "crops" / f"{i}.jpg", i % 2, "", ""))
    config = resolve_inputs(ExperimentConfig(data_root=tmp_path, architecture="timm:test_efficientnet", pretrained=False, image_size=32,
                                             batch_size=3, num_workers=0, device="cpu"))
    assert [len(batch) for batch in build_loader(config, samples, train=True)] == sizes
    assert sum(len(batch) for batch in build_loader(config, samples, train=False)) == count
