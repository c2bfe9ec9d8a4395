"""torch.distributed helpers so that every rank ends a memory update with the same basis.

All functions are no-ops (they return their input) when torch.distributed is not initialised or the
world has one process. Communication happens on the current CUDA device under NCCL and on CPU
otherwise; results come back on the input's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo and others are fine on CPU.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over all ranks (same shape on every rank)."""
    if not is_distributed():
        return t
    buf = t.to(_comm_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate the rows of a 2-D ``t`` (N_r, F) of every rank, rank 0 first.

    N_r may differ between ranks, and may be 0 (then ``t`` may be (0, 0): F is taken from the others).
    """
    if not is_distributed():
        return t
    dev = _comm_device()
    shape = torch.tensor(list(t.shape), dtype=torch.int64, device=dev)
    shapes = [torch.zeros_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    counts = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
    padded = torch.zeros((max(counts), width), dtype=t.dtype, device=dev)
    if t.shape[0] > 0:
        padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def broadcast_matrix(t: Tensor) -> Tensor:
    """Rank 0's 2-D float64 matrix on every rank, bit-identical; other ranks' shapes may differ."""
    if not is_distributed():
        return t
    dev = _comm_device()
    shape = torch.tensor(list(t.shape), dtype=torch.int64, device=dev)
    dist.broadcast(shape, src=0)
    rows, cols = (int(v) for v in shape.tolist())
    buf = t.to(dev, torch.float64).contiguous() if dist.get_rank() == 0 else None
    if buf is None or tuple(buf.shape) != (rows, cols):
        buf = torch.empty((rows, cols), dtype=torch.float64, device=dev)
    if cols > 0 and rows > 0:
        dist.broadcast(buf, src=0)
    return buf.to(t.device)
