"""The runtime under the stages: processes and devices, DDP, determinism, mixed precision, progress bars.

Like torchvision's ``references/classification/utils.py`` beside its ``train.py``: training,
prediction and embedding import these helpers; this module imports nothing of the stages
(only ``config`` and ``errors``), so evaluation and active learning need nothing of the
training loop for them.

torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are read in one place
(``distributed_context``); every collective helper is a no-op when not distributed.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from classification.config import ExperimentConfig
from classification.errors import UserError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- processes and devices


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistributedContext:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them: the one place they are read."""
    return DistributedContext(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                              int(os.environ.get("LOCAL_RANK", 0)))


# Set to 1 for torchrun ranks to share the GPUs there are (rank k on GPU k mod count), CUDA tensors
# over gloo as NCCL refuses two ranks on one GPU: for checking DDP on a one-GPU machine, not for speed.
SHARE_GPUS_ENV = "CLASSIFICATION_SHARE_GPUS"


def shares_gpus() -> bool:
    """Whether ``SHARE_GPUS_ENV`` asks torchrun's ranks to share GPUs."""
    return os.environ.get(SHARE_GPUS_ENV, "") == "1"


def select_device(name: str, context: DistributedContext) -> torch.device:
    """``auto`` -> CUDA (this process's local GPU under torchrun), else MPS, else CPU.

    Under torchrun every rank takes its ``LOCAL_RANK`` GPU: ``cuda:N`` would put all ranks on GPU N.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda"):
        if name != "cuda" and context.distributed:
            raise UserError(f"device: {name} under torchrun ({context.world_size} processes): use device: cuda or auto, "
                            "each rank takes its LOCAL_RANK GPU (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if not torch.cuda.is_available():
            raise UserError(f"device: {name} asked for, but no CUDA GPU is visible (use device: auto or cpu)")
        count = torch.cuda.device_count()
        index = context.local_rank if name == "cuda" else int(name.split(":")[1])
        if context.distributed and shares_gpus():
            index %= count
        if index >= count and context.distributed:
            raise UserError(f"torchrun rank with LOCAL_RANK {index}, but this machine shows {count} CUDA GPU(s): start at most "
                            f"{count} processes per node (--nproc_per_node), or set {SHARE_GPUS_ENV}=1 to share them")
        if index >= count:
            raise UserError(f"device: cuda:{index} asked for, but this machine shows {count} CUDA GPU(s) "
                            f"(cuda:0 to cuda:{count - 1})")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device: mps asked for, but this machine has no MPS device (use device: auto or cpu)")
    return torch.device(name)


def process_group_backend(device: torch.device) -> str:
    """The process group's backend per device type: on CUDA, NCCL for the model's tensors (gloo when ranks
    share GPUs, ``SHARE_GPUS_ENV``) and gloo for the small CPU flags and metric counts (``max_over_ranks``,
    ``all_reduce_metrics``); gloo alone elsewhere."""
    if device.type != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:gloo" if shares_gpus() else "cpu:gloo,cuda:nccl"


def init_distributed(context: DistributedContext, device: torch.device) -> None:
    """Join the torchrun process group (``process_group_backend``); bound to this rank's GPU on CUDA, so
    that barriers and NCCL's communicators use it."""
    if context.distributed and not dist.is_initialized():
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(process_group_backend(device), device_id=device_id)


def close_distributed(context: DistributedContext) -> None:
    """Leave the process group that ``init_distributed`` joined (no-op when not distributed)."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if context.distributed:
        dist.barrier()


def max_over_ranks(context: DistributedContext, *flags: int) -> list[int]:
    """The largest value of each flag over all ranks (ranks stop and skip batches together); a CPU
    tensor, reduced by the group's CPU backend (``process_group_backend``)."""
    if not context.distributed:
        return list(flags)
    values = torch.tensor(flags, dtype=torch.int64, device="cpu")
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [int(v) for v in values]


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place (unchanged when not distributed)."""
    if context.distributed:
        dist.all_reduce(tensor)
    return tensor


def gather_objects(value: object, context: DistributedContext) -> list[object]:
    """Every rank's ``value``, in rank order (``[value]`` when not distributed); pickled over the CPU backend."""
    if not context.distributed:
        return [value]
    values: list[object] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def share_rank0_weights(model: nn.Module, context: DistributedContext) -> None:
    """Give every rank rank 0's weights and buffers: BatchNorm statistics (and EMA buffers) drift per
    rank, and all ranks must score the one model that rank 0 saves."""
    if context.distributed:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


# ---------------------------------------------------------------- seeds and determinism


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); the same seed on every rank, so weights start equal."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_deterministic(setting: bool | str, device: torch.device) -> bool:
    """``deterministic: auto`` is exact where that costs nothing (the CPU, MPS) and fast on CUDA."""
    return device.type != "cuda" if setting == "auto" else bool(setting)


def configure_determinism(setting: bool | str, device: torch.device) -> None:
    """Deterministic kernels and no cuDNN autotuning, or the fast settings (``is_deterministic``).

    Deterministic on a GPU means: cuDNN's deterministic algorithms, no autotuning, cuBLAS with a
    fixed workspace, and the same seeds and batches; kernels with no deterministic CUDA version
    (the backward of adaptive average pooling, in every ResNet and EfficientNet) still run, with a
    warning, so a GPU run repeats closely but not bit for bit. On the CPU it is bit for bit.
    """
    deterministic = is_deterministic(setting, device)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


# ---------------------------------------------------------------- mixed precision and memory format


CHANNELS_LAST_DEVICES = ("cuda", "cpu")  # where convolutions run faster in it (CPU: benchmarks/bench_training.py --num-workers)


def uses_channels_last(config: ExperimentConfig, device: torch.device) -> bool:
    """channels_last memory format: ``auto`` turns it on for CUDA and the CPU (oneDNN's convolutions prefer it:
    1.05-1.9x for training and prediction on a 2-core CPU, docs/benchmarks.md), off elsewhere (MPS)."""
    return config.channels_last == "on" or (config.channels_last == "auto" and device.type in CHANNELS_LAST_DEVICES)


def autocast_dtype(config: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast on CUDA only (None: full precision)."""
    if config.amp == "off":
        return None
    if device.type != "cuda":
        log.warning("amp: %s applies on CUDA only; running in float32 on %s", config.amp, device)
        return None
    return torch.bfloat16 if config.amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """Mixed-precision context for a forward pass in ``dtype`` (a no-op for None: float32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- progress


def progress_bar(total: int, initial: int, description: str, context: DistributedContext) -> tqdm:
    """One bar per pass on rank 0, shown only when stderr is a terminal."""
    return tqdm(total=total, initial=initial, desc=description, unit="batch", leave=False, dynamic_ncols=True,
                disable=not (context.is_main and sys.stderr.isatty()))
