"""torchrun with two CPU processes (gloo): trains, writes every file once from rank 0, and resumes under DDP."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from classification.config import ExperimentConfig, load_config
from classification.data.samples import build_samples
from classification.errors import UserError
from classification.runtime import SHARE_GPUS_ENV, DistributedContext, is_deterministic, process_group_backend, select_device
from classification.training.checkpoint import load_checkpoint
from classification.training.data import build_loader
from classification.training.models import build_model, resolve_inputs
from classification.training.resume import check_world_size
from classification.training.rng_state import rank_rng_state
from classification.training.run_folder import recorded_world_size
from tests.helpers.processes import REPO_ROOT
from tests.helpers.training import build_dataset, read_metrics, train_command, train_env, write_run


def torchrun(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 classifier/train.py --config CONFIG ...``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "classifier" / "train.py"), "--config", str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=config.parent, env=train_env(), timeout=600)


def evaluate_alone(config: ExperimentConfig, weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Validation loss and top-1 of ``weights`` in this one process (no sharding)."""
    model = build_model(config.architecture, 4, pretrained=False)
    model.load_state_dict(weights)
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for batch in build_loader(resolve_inputs(config), build_samples(config, config.val_split), train=False):
            logits = model(batch.images)
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(1) == batch.labels).sum())
            count += len(batch)
    return loss_sum / count, correct / count


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_resume(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "data")
    config = write_run(tmp_path / "runs" / "tiny" / "ddp", dataset, comet="offline", ema_decay=0.9)
    run_dir = config.parent
    result = torchrun(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("epoch 2/2:") == 1  # one log line per epoch: rank 0 only
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1.pt", "2.pt", "best.pt", "last.pt"]
    assert [row["epoch"] for row in read_metrics(run_dir)] == ["1", "2"]
    (archive,) = (run_dir / "comet").glob("*.zip")  # one Comet experiment, from rank 0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["resumed_from"] is None
    first = read_metrics(run_dir)
    loss, top1 = evaluate_alone(load_config(config), load_checkpoint(run_dir / "checkpoints" / "2.pt")["ema"])
    assert float(first[1]["val_loss"]) == pytest.approx(loss, rel=1e-5)  # the two shards cover val exactly once
    assert float(first[1]["val_top1"]) == pytest.approx(top1)

    result = torchrun(config, "--resume", "--set", "num_epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting at epoch 3" in result.stderr
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["epoch"] == 3 and checkpoint["comet_key"] == archive.stem  # the same Comet experiment goes on
    assert checkpoint["ema"] is not None
    assert checkpoint["world_size"] == 2 and len(checkpoint["rank_rng"]) == 2  # each rank's dropout/sampler randomness
    rows = read_metrics(run_dir)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"] and rows[:2] == first
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["resumed_from"].endswith("last.pt")
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporary file left behind


def test_resuming_on_another_number_of_processes_needs_force_and_rebuilds_the_schedule(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "data")
    config = write_run(tmp_path / "runs" / "tiny" / "grow", dataset, comet="off", num_epochs=1)
    alone = subprocess.run(train_command(config), capture_output=True, text=True, env=train_env(), timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    steps_alone = load_checkpoint(config.parent / "checkpoints" / "last.pt")["step"]
    refused = torchrun(config, "--set", "num_epochs=2")
    assert refused.returncode != 0 and "saved by a run of 1 process(es), this one has 2; resume anyway with --force" in refused.stderr
    assert f'File "{REPO_ROOT / "classification"}' not in refused.stderr  # one line from each rank (torchrun adds its own)
    forced = torchrun(config, "--set", "num_epochs=2", "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    checkpoint = load_checkpoint(config.parent / "checkpoints" / "last.pt")
    steps_per_epoch = checkpoint["step"] // 2  # both epochs counted in this run's steps (half the images per rank)
    assert checkpoint["step"] == 2 * steps_per_epoch and steps_per_epoch < steps_alone
    assert checkpoint["scheduler"]["last_epoch"] == checkpoint["step"] and checkpoint["world_size"] == 2


def reduce_metrics_worker(rank: int, init_file: str, results: str) -> None:
    """Rank 0 validates two batches under inference mode, rank 1 none (an empty shard); both reduce."""
    import torch.distributed as dist  # noqa: PLC0415 - runs in the spawned worker process

    from classification.runtime import DistributedContext, max_over_ranks  # noqa: PLC0415 - runs in the spawned worker process
    from classification.training.engine import all_reduce_metrics  # noqa: PLC0415 - runs in the spawned worker process
    from classification.training.metrics import MetricAccumulator  # noqa: PLC0415 - runs in the spawned worker process

    dist.init_process_group("cpu:gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    context = DistributedContext(rank, 2, rank)
    with torch.inference_mode():  # as ``evaluate`` does
        metrics = MetricAccumulator(3)
        if rank == 0:
            metrics.update(torch.tensor([[4.0, 0, 0], [0, 4.0, 0]]), torch.tensor([0, 2]), 1.5)
    all_reduce_metrics(metrics, context)
    reduced = {**metrics.compute(), "num_samples": metrics.num_samples}
    flags = max_over_ranks(context, rank, 1 - rank)
    metrics.reset()  # the next epoch writes the same counts outside inference mode
    metrics.update(torch.tensor([[0.0, 4.0, 0]]), torch.tensor([1]), 0.5)
    Path(results, f"{rank}.json").write_text(json.dumps({"samples": reduced["num_samples"], "top1": reduced["top1"],
                                                         "after_reset": metrics.num_samples, "flags": flags}))
    dist.destroy_process_group()


def test_ranks_reduce_metrics_from_an_empty_shard_and_under_inference_mode(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(reduce_metrics_worker, args=(str(tmp_path / "init"), str(results)), nprocs=2)
    for rank in (0, 1):
        answer = json.loads((results / f"{rank}.json").read_text())
        assert answer == {"samples": 2, "top1": 0.5, "after_reset": 1, "flags": [1, 1]}


def test_the_process_group_serves_cpu_flags_beside_nccl() -> None:
    backends = dict(part.split(":") for part in process_group_backend(torch.device("cuda", 0)).split(","))
    assert backends == {"cpu": "gloo", "cuda": "nccl"}  # max_over_ranks() and the metric counts are CPU tensors
    assert process_group_backend(torch.device("cpu")) == "gloo"


def test_a_fixed_gpu_under_torchrun_is_one_line() -> None:
    with pytest.raises(UserError, match="device: cuda:1 under torchrun .*LOCAL_RANK"):
        select_device("cuda:1", DistributedContext(rank=1, world_size=2, local_rank=1))


def test_deterministic_auto_is_exact_on_the_cpu_and_fast_on_cuda(tmp_path: Path) -> None:
    assert is_deterministic("auto", torch.device("cpu")) and not is_deterministic("auto", torch.device("cuda", 0))
    assert is_deterministic(True, torch.device("cuda", 0)) and not is_deterministic(False, torch.device("cpu"))
    (tmp_path / "config.yml").write_text("data_root: .\ndeterministic: auto\n")
    assert load_config(tmp_path / "config.yml").deterministic == "auto"
    (tmp_path / "config.yml").write_text("data_root: .\n")
    assert load_config(tmp_path / "config.yml").deterministic == "auto"  # the default


def test_each_rank_resumes_from_its_own_random_states() -> None:
    checkpoint = {"rng": "rank 0", "rank_rng": ["rank 0", "rank 1"], "world_size": 2}
    assert [rank_rng_state(checkpoint, rank, 2) for rank in (0, 1)] == ["rank 0", "rank 1"]
    assert rank_rng_state(checkpoint, 2, 4) == "rank 0"  # another world size (forced): rank 0's for all
    assert rank_rng_state({"rng": "old"}, 1, 2) == "old"  # saved before per-rank states


def test_a_checkpoint_without_a_world_size_is_checked_against_run_info(tmp_path: Path) -> None:
    (tmp_path / "run_info.json").write_text(json.dumps({"world_size": 4}))
    assert recorded_world_size(tmp_path) == 4 and recorded_world_size(tmp_path / "none") is None
    with pytest.raises(UserError, match="saved by a run of 4 process"):
        check_world_size({}, tmp_path / "last.pt", 1, force=False, recorded=recorded_world_size(tmp_path))
    assert check_world_size({"world_size": 1}, tmp_path / "last.pt", 1, force=False, recorded=4) is False


def test_ranks_may_share_one_gpu_over_gloo_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHARE_GPUS_ENV, "1")
    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:gloo"  # NCCL refuses two ranks on one GPU


def served_devices(backend: str) -> list[str]:
    """The device types a backend string serves ("nccl" alone serves CUDA only, as NCCL does)."""
    if ":" not in backend:
        return ["cuda"] if backend == "nccl" else ["cpu", "cuda"]
    return [part.split(":")[0] for part in backend.split(",")]


def max_over_ranks_worker(rank: int, init_file: str, results: str) -> None:
    """A gloo group serving exactly the device types the CUDA run's backend serves; then ``max_over_ranks``."""
    import torch.distributed as dist  # noqa: PLC0415 - runs in the spawned worker process

    from classification.runtime import DistributedContext, max_over_ranks, process_group_backend  # noqa: PLC0415 - runs in the spawned worker process

    served = served_devices(process_group_backend(torch.device("cuda", 0)))
    dist.init_process_group(",".join(f"{device}:gloo" for device in served), init_method=f"file://{init_file}",
                            rank=rank, world_size=2)
    try:
        Path(results, f"{rank}.json").write_text(json.dumps(max_over_ranks(DistributedContext(rank, 2, rank), rank, 0)))
    finally:
        dist.destroy_process_group()


def test_max_over_ranks_runs_on_the_backends_a_cuda_run_has() -> None:
    with tempfile.TemporaryDirectory() as folder:  # the CPU flags crashed a group that served CUDA only (NCCL)
        torch.multiprocessing.spawn(max_over_ranks_worker, args=(str(Path(folder) / "init"), folder), nprocs=2)
        assert [json.loads(Path(folder, f"{rank}.json").read_text()) for rank in (0, 1)] == [[1, 0], [1, 0]]
