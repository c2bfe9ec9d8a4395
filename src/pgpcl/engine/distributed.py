"""Multi-process training through PyTorch's own engine (torch.distributed + DistributedDataParallel).

Launch with torchrun, one process per GPU (NCCL) or per CPU worker (gloo)::

    torchrun --nproc_per_node=4 -m pgpcl train cifar100_10_l2p_pgp
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 -m pgpcl train ...

Contract:

- ``train.batch_size`` is the GLOBAL batch: global batch ``b`` of an epoch is ``perm[b*B:(b+1)*B]`` of one
  seeded permutation (the same on every rank) and rank ``r`` trains on its slice ``[r::world]``
  (DistributedSampler-style: disjoint, together the whole global batch). Each rank's loss is weighted
  by its share of the global batch, so after DDP averages the gradients the step equals one process
  taking the same global batch (up to float summation order).
  ``train.lr_scale_by_batch`` scales by this global batch. (The released L2P/DualPrompt scripts took
  ``--batch-size`` per GPU; to mirror an 8-GPU release run set ``train.batch_size`` to 8x theirs.)
- Operations that couple the samples of a batch see only the rank's share of it: L2P's batch-wise
  prompt vote (``method.batchwise_prompt=true``, the released default) votes per rank (as the released
  code does when run on several GPUs), and so does DualPrompt's for a task past a smaller E-prompt pool
  (``method.pool_size`` below the number of tasks). With it off (and DualPrompt, whose training selection
  is otherwise forced by the task),
  N processes reproduce one process to float precision.
- Augmentation is seeded per sample from (epoch seed, position in the permutation), so it does not
  depend on the number of processes or on where a resumed run skipped to.
- Evaluation and the PGP representation pass shard whole batches (contiguous blocks of batches per
  rank, so batch composition and, for ``pgp.mode=reference``, sample order are those of one process);
  accuracy counts are all-reduced and the projection collectors combine every rank's features
  (:meth:`RepresentationCollector.synchronize`), so every rank holds the same bases.
- Only rank 0 writes files (and reads checkpoints on ``--resume``: it sends the state to the other ranks,
  so the run folder need only be on rank 0's machine). A run may be resumed with another number of
  processes: positions count global batches.
- Ranks agree on errors and interrupts at sync points (set-up, every step, after evaluation, before a
  basis is built), so a bad image or Ctrl+C on one rank stops all of them cleanly; the error is printed
  once (by rank 0, or by the rank that alone met it). Errors found before the processes connect (a
  bad config) are printed by every process.

Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op and the same code runs in
one process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pgpcl.errors import ConfigError, one_line


class PeerFailed(Exception):
    """Another rank hit an error (it prints the message); this rank stops quietly."""


@dataclass
class DistContext:
    """Where this process stands in a (possibly 1-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in one process) -------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a float64 CPU tensor; returned on CPU."""
        if not self.enabled:
            return values
        import torch.distributed as dist

        buf = values.to(self._comm_device(), torch.float64).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.cpu()

    def broadcast_object(self, obj):
        """Rank 0's picklable ``obj`` on every rank: engine-made values, from flags to a resumed run's whole
        checkpoint (read once, by rank 0, and sent to the others)."""
        return self.broadcast_object_from(0, obj)

    def broadcast_object_from(self, src: int, obj):
        """Rank ``src``'s picklable ``obj`` on every rank (engine-made values only: unpickling runs code)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._comm_device())
        return box[0]

    def agree(self, error: BaseException | None = None, stop: bool = False) -> bool:
        """Sync point: raise if any rank failed, return True if any rank was asked to stop.

        The rank whose error it is re-raises it (rank 0's wins when several failed, so the message is
        printed once); the others raise :class:`PeerFailed`.
        """
        if not self.enabled:
            if error is not None:
                _mark_agreed(error)
                raise error
            return stop
        flags = torch.zeros(self.world_size + 1, dtype=torch.float64)
        if error is not None:
            flags[self.rank] = 1.0
        flags[-1] = float(stop)
        flags = self.all_reduce_sum(flags)
        failed = [r for r in range(self.world_size) if flags[r] > 0]
        if failed:
            # every rank learns the first failure's message, so rank 0 can record it in results.json
            mine = (one_line(error) or type(error).__name__) if self.rank == failed[0] else None
            message = self.broadcast_object_from(failed[0], mine)
            if error is not None and (self.is_main or 0 not in failed):
                _mark_agreed(error)
                raise error
            raise PeerFailed(f"rank {failed[0]} failed: {message}")
        return bool(flags[-1] > 0)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def _mark_agreed(error: BaseException) -> None:
    """Errors raised by :meth:`DistContext.agree` are known to every rank: callers must not sync them again."""
    error._pgpcl_agreed = True


def already_agreed(error: BaseException) -> bool:
    return bool(getattr(error, "_pgpcl_agreed", False))


_group_joined = False  # set once this process has joined a process group (it stays set after it leaves)


def group_joined() -> bool:
    """Whether this process has joined a torchrun process group, now or earlier."""
    return _group_joined


def launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device_name: str) -> DistContext:
    """A 1-process context, or join the torchrun job described by the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT): NCCL with GPU ``cuda:LOCAL_RANK``, gloo on CPU."""
    from pgpcl.engine.seed import resolve_device

    world = launched_world_size()
    if world <= 1:
        return DistContext(device=resolve_device(device_name))
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = resolve_device(device_name).type
    if kind == "cuda":
        if ":" in device_name:
            raise ConfigError(
                f"train.device={device_name} names one GPU, but under torchrun each process takes GPU "
                "LOCAL_RANK; use train.device=cuda or auto"
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; lower "
                "--nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif kind == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise ConfigError(f"train.device={device_name} is not supported under torchrun; use cuda or cpu")
    global _group_joined
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend)
        owns = True
    _group_joined = True
    return DistContext(rank, dist.get_world_size(), local_rank, dist.get_backend(), device, owns)


# ----------------------------------------------------------------------------------------------------
# Loaders: which rank loads which samples, with per-sample augmentation seeds


def derive_seed(*parts: int) -> int:
    from pgpcl.data.scenario import derive_seed as _derive

    return _derive(*parts)


class SeededItems(Dataset):
    """Wraps a scenario's TaskDataset; a batch is a list of ``(item, seed)``. Augmenting transforms
    draw each item from a generator seeded with its own seed, so a sample's augmentation depends only
    on that seed: not on the batch it lands in, the rank, the loader workers, or skipped batches."""

    def __init__(self, base):
        self.base = base
        self.augments = bool(getattr(getattr(base, "transform", None), "augments", False))

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, batch: Sequence[tuple[int, int]]):
        if not self.augments:
            return self.base.__getitems__([int(i) for i, _ in batch])
        parts = []
        for i, seed in batch:
            self.base.reseed(int(seed))
            parts.append(self.base.__getitems__([int(i)]))
        return tuple(torch.cat(p) for p in zip(*parts))

    def __getitem__(self, i: int):  # pragma: no cover - the loader always uses __getitems__
        x, y, t = self.__getitems__([(i, 0)])
        return x[0], y[0], t[0]


class _Batches:
    """A batch sampler over precomputed batches of ``(item, seed)``."""

    def __init__(self, batches: list[list[tuple[int, int]]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _passthrough(batch):
    return batch


class InProcessLoader:
    """Yields ``items.__getitems__(batch)`` for each batch in order, in this process.

    What a DataLoader with ``num_workers=0`` and no pinned memory does with these batches, without
    its per-loader and per-batch machinery (~0.3 ms per tiny-preset epoch, about as much as a PGP
    basis pass's whole data loading; BENCHMARKS.md section 5).
    """

    def __init__(self, items: SeededItems, batches: list[list[tuple[int, int]]]):
        self.dataset, self.batches = items, batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for batch in self.batches:
            yield self.dataset.__getitems__(batch)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(dataset, batches: list[list[tuple[int, int]]], data_cfg, seed: int) -> DataLoader | InProcessLoader:
    """A loader yielding ``(x, y, task)`` for each of ``batches`` in order (an in-process one when
    ``data.num_workers`` is 0 and memory is not pinned, a DataLoader otherwise)."""
    items = SeededItems(dataset)
    if data_cfg.num_workers == 0 and not data_cfg.pin_memory:
        return InProcessLoader(items, batches)
    return DataLoader(
        items,
        batch_sampler=_Batches(batches),
        collate_fn=_passthrough,
        num_workers=data_cfg.num_workers,
        pin_memory=data_cfg.pin_memory,
        # Our own generator: creating a loader never draws from the global RNG.
        generator=torch.Generator().manual_seed(seed % (1 << 63)),
    )


class EpochPlan:
    """One epoch of training data: a seeded permutation cut into global batches of ``batch_size``;
    rank ``r`` of ``world`` trains on ``global_batch[r::world]``."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, augments: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.augments = rank, world, augments
        self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed % (1 << 63))).tolist()
        self.num_batches = math.ceil(n / batch_size)

    def global_size(self, b: int) -> int:
        return min(self.batch_size, self.n - b * self.batch_size)

    def local(self, b: int) -> tuple[list[tuple[int, int]], bool]:
        """This rank's ``(item, seed)`` list for global batch ``b`` and whether it is real.

        When the global batch has fewer samples than ranks, a rank with no sample gets the batch's
        first sample as a stand-in (its loss is weighted 0), so every rank still takes part in DDP.
        """
        lo = b * self.batch_size
        positions = list(range(lo, lo + self.global_size(b)))
        mine = positions[self.rank :: self.world]
        real = bool(mine)
        if not real:
            mine = positions[:1]
        seed = (lambda p: derive_seed(self.seed, 5, p)) if self.augments else (lambda p: 0)
        return [(self.perm[p], seed(p)) for p in mine], real

    def loader(self, dataset, data_cfg, start: int = 0) -> tuple[DataLoader | InProcessLoader, list[bool]]:
        """Loader over batches ``start..num_batches-1`` of this rank, and which of them are real."""
        parts = [self.local(b) for b in range(start, self.num_batches)]
        return make_loader(dataset, [p[0] for p in parts], data_cfg, self.seed), [p[1] for p in parts]


def shard_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Items ``0..n-1`` in order, cut into batches, and this rank's contiguous block of those batches."""
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    if world <= 1:
        return batches
    blocks = np.array_split(np.arange(len(batches)), world)
    return [batches[int(i)] for i in blocks[rank]]


def sharded_loader(
    dataset, batch_size: int, data_cfg, dist_ctx: DistContext | None, seed: int = 0
) -> DataLoader | InProcessLoader:
    """Fixed-order loader over this rank's share of ``dataset`` (evaluation, PGP samples).

    Item ``i`` draws its augmentation (if the dataset's transform augments) from ``derive_seed(seed, 5, i)``.
    """
    rank, world = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx is not None else (0, 1)
    batches = shard_batches(len(dataset), batch_size, rank, world)
    augments = bool(getattr(getattr(dataset, "transform", None), "augments", False))
    seeded = [[(i, derive_seed(seed, 5, i) if augments else 0) for i in b] for b in batches]
    return make_loader(dataset, seeded, data_cfg, seed)


__all__ = [
    "DistContext",
    "EpochPlan",
    "InProcessLoader",
    "PeerFailed",
    "SeededItems",
    "init_distributed",
    "launched_world_size",
    "make_loader",
    "shard_batches",
    "sharded_loader",
]
