"""Memory updates under torch.distributed (2 gloo processes on CPU): same bases on every rank, equal
to a single-process update on the union of the ranks' data."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgpcl.projection import GramCollector, SampleCollector, SubspaceMemory
from pgpcl.projection.linalg import grow_basis
from pgpcl.projection.reference import reference_update, sum_space

DIM, TOKENS = 12, 4


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(DIM, TOKENS, DIM, generator=g) * torch.linspace(2, 0.2, DIM)  # 12 samples
    extra = torch.randn(7, DIM, generator=g)
    return tokens, extra


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tokens, extra = _data(0)
        mine = tokens[: DIM // 2] if rank == 0 else tokens[DIM // 2 :]  # rank 0 holds the first half

        feature = SubspaceMemory("feature")
        col = GramCollector(DIM)
        col.add(mine)
        col.add_extra(extra)
        info = feature.update("w", col, 0.9)
        full = GramCollector(DIM)
        full.add(tokens)
        full.add_extra(extra)
        expected, _, _ = grow_basis(torch.zeros(DIM, 0, dtype=torch.float64), full.gram(), 0.9)
        assert info.num_rows == DIM * TOKENS
        _check(feature.basis("w"), expected)

        reference = SubspaceMemory("reference")
        col = SampleCollector(DIM, components=3)
        col.add(mine)
        col.add_extra(extra)
        reference.update("w", col, 0.9)
        expected, _, _ = reference_update(sum_space(tokens.reshape(DIM, -1), extra, 3), None, 0.9)
        _check(reference.basis("w"), expected)

        # A rank that drew no samples at all still takes part and gets the same basis.
        lopsided = SubspaceMemory("reference")
        col = SampleCollector(DIM, components=3)
        if rank == 0:
            col.add(tokens)
        col.add_extra(extra)
        lopsided.update("w", col, 0.9)
        _check(lopsided.basis("w"), expected)
    finally:
        dist.destroy_process_group()


def _check(basis: torch.Tensor, expected: torch.Tensor) -> None:
    parts = _gathered(basis)
    assert all(torch.equal(p, parts[0]) for p in parts), "ranks hold different bases"
    assert basis.shape == expected.shape
    assert torch.allclose(basis @ basis.T, expected @ expected.T, atol=1e-8)


def test_bases_identical_across_ranks_and_equal_to_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
