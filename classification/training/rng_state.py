"""Random states for exact resumes: Python's, NumPy's legacy global, torch's CPU and CUDA generators.

Saved as tensors and plain values (``capture_rng_state``), so a checkpoint loads with
``torch.load(weights_only=True)``; each rank saves its own and reads its own back (``rank_rng_state``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "rank_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global) and torch CPU/CUDA random states, as tensors and plain values."""
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # legacy=True: the MT19937 tuple, never the dict
    kind, keys, position, has_gauss, cached = numpy_state
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the random states saved by ``capture_rng_state`` (CUDA only when the same GPUs exist)."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def rank_rng_state(checkpoint: Mapping[str, Any], rank: int, world_size: int) -> Mapping[str, Any]:
    """This rank's saved random states: its own when the checkpoint has them for this many processes,
    else rank 0's (a checkpoint from before per-rank states, or a forced change of world size)."""
    per_rank = checkpoint.get("rank_rng") or []
    return per_rank[rank] if len(per_rank) == world_size else checkpoint["rng"]
