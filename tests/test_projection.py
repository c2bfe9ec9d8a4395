"""Tests of pgpcl.projection: bases, eps ranks, GPM growth, projection targets, views, checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from pgpcl.config import PGPConfig
from pgpcl.errors import CheckpointError, ConfigError
from pgpcl.projection import (
    PGP,
    Block,
    GramCollector,
    Projector,
    ProtectedGroup,
    SampleCollector,
    SubspaceMemory,
)
from pgpcl.projection.reference import first_basis

ENERGIES = [0.4, 0.3, 0.2, 0.1]  # cumulative 0.4, 0.7, 0.9, 1.0


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def rows_with_spectrum(energies: list[float], directions: torch.Tensor, n: int = 30, seed: int = 0):
    """R (n, D) = Q diag(sqrt(e)) V^T: its Gram R^T R has eigenvalues ``energies`` along V's columns."""
    q = orthonormal(n, len(energies), seed + 100)
    return q @ torch.diag(torch.tensor(energies, dtype=torch.float64).sqrt()) @ directions.T


def feature_update(memory: SubspaceMemory, name: str, rows: torch.Tensor, eps: float, extra=None, **kw):
    col = GramCollector(rows.shape[-1], **kw)
    col.add(rows)
    if extra is not None:
        col.add_extra(extra)
    return memory.update(name, col, eps)


def basis_with_rank(dim: int, rank: int, seed: int = 0, name: str = "w") -> SubspaceMemory:
    """A feature-mode memory whose basis for ``name`` is a random rank-``rank`` subspace of R^dim."""
    memory = SubspaceMemory()
    rows = rows_with_spectrum([1.0] * rank, orthonormal(dim, rank, seed), n=rank + 5, seed=seed)
    feature_update(memory, name, rows, 1.0)
    assert memory.rank(name) == rank
    return memory


def assert_orthonormal(u: torch.Tensor, atol: float = 1e-10) -> None:
    eye = torch.eye(u.shape[1], dtype=u.dtype)
    assert torch.allclose(u.T @ u, eye, atol=atol)


# -------------------------------------------------------------------------------- memory, feature mode


@pytest.mark.parametrize(
    ("eps", "rank"),
    [(0.1, 1), (0.4, 1), (0.41, 2), (0.7, 2), (0.71, 3), (0.9, 3), (0.95, 4), (1.0, 4)],
)
def test_rank_chosen_by_eps_on_known_spectrum(eps, rank):
    directions = orthonormal(10, 4, seed=1)
    memory = SubspaceMemory()
    info = feature_update(memory, "w", rows_with_spectrum(ENERGIES, directions), eps)
    assert info.rank_after == rank
    assert info.energy_captured == pytest.approx(np.cumsum(ENERGIES)[rank - 1])
    # The kept directions are the top ones of the spectrum.
    u = memory.basis("w")
    assert torch.allclose(u @ u.T, directions[:, :rank] @ directions[:, :rank].T, atol=1e-8)


def test_basis_orthonormal_after_several_updates_and_never_exceeds_dim():
    memory = SubspaceMemory()
    g = torch.Generator().manual_seed(0)
    for task, eps in enumerate([0.5, 0.9, 0.97, 0.99, 1.0, 1.0]):
        rows = torch.randn(40, 3, 12, generator=g) * torch.linspace(3, 0.1, 12)
        extra = torch.randn(5, 12, generator=g)
        info = feature_update(memory, "w", rows, eps, extra=extra)
        assert info.rank_after >= info.rank_before
        assert_orthonormal(memory.basis("w"))
        assert memory.rank("w") <= 12, task
    assert memory.rank("w") == 12  # eps = 1 on full-rank data fills the space, and no more


def _column_by_column(basis: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt one column at a time, written out: what extend_orthonormal must equal."""
    cols = basis
    for j in range(new.shape[1]):
        v = new[:, j : j + 1]
        for _ in range(2):
            v = v - cols @ (cols.T @ v)
        if float(v.norm()) >= 0.5:
            cols = torch.cat([cols, v / v.norm()], dim=1)
    return cols


@pytest.mark.parametrize("case", ["complement", "general", "duplicate", "overflow"])
def test_extend_orthonormal_equals_column_by_column_gram_schmidt(case):
    from pgpcl.projection.linalg import _extend_block, extend_orthonormal

    full = orthonormal(10, 10, seed=1)
    basis, new = full[:, :3], orthonormal(10, 4, seed=2)
    if case == "complement":  # what grow_basis passes: orthonormal directions outside span(basis)
        new = full[:, 3:7]
    if case == "duplicate":  # the third candidate lies (almost) in the basis: it must be dropped
        new[:, 2] = basis[:, 0] * 0.99 + new[:, 2] * 0.01
    if case == "overflow":  # the complement fills R^10, then more candidates come: stop at D columns
        new = torch.cat([full[:, 3:], orthonormal(10, 2, seed=3)], dim=1)
    got, want = extend_orthonormal(basis, new), _column_by_column(basis, new)
    assert (_extend_block(basis, new) is not None) == (case == "complement")  # the block path
    assert got.shape == want.shape
    assert got.shape[1] == {"complement": 7, "general": 7, "duplicate": 6, "overflow": 10}[case]
    assert torch.allclose(got, want, atol=1e-10)
    assert_orthonormal(got)


def test_growth_adds_nothing_for_same_data_and_stops_exactly_at_target():
    e = torch.eye(8, dtype=torch.float64)
    memory = SubspaceMemory()
    info = feature_update(memory, "w", rows_with_spectrum(ENERGIES, e[:, :4]), 0.7)
    assert info.rank_after == 2  # 0.4 + 0.3 reaches 0.7 exactly: the boundary counts as reached
    task2 = rows_with_spectrum([0.5, 0.3, 0.2], e[:, [0, 4, 5]], seed=3)  # e0 already protected
    info = feature_update(memory, "w", task2, 0.7)
    assert (info.rank_before, info.rank_after) == (2, 3)  # 0.5 explained + 0.3 for e4 = 0.8 >= 0.7
    assert info.energy_before == pytest.approx(0.5)
    assert info.energy_captured == pytest.approx(0.8)
    new = memory.basis("w")[:, 2]
    assert abs(float(new @ e[:, 4])) == pytest.approx(1.0)
    # The same data again: already at the target, nothing is added, nothing duplicated.
    info = feature_update(memory, "w", task2, 0.7)
    assert info.rank_after == info.rank_before == 3
    # A higher target needs exactly the remaining direction e5.
    info = feature_update(memory, "w", task2, 0.85)
    assert info.rank_after == 4
    assert_orthonormal(memory.basis("w"))


@pytest.mark.parametrize(("dim", "batches", "tokens"), [(3, 1, 1), (17, 2, 5), (64, 3, 1), (5, 50, 7)])
def test_feature_mode_any_dim_and_sample_count(dim, batches, tokens):
    memory = SubspaceMemory()
    col = GramCollector(dim)
    for _ in range(batches):
        rows = torch.randn(2, tokens, dim) if tokens > 1 else torch.randn(2, dim)  # (B, n, D) or (B, D)
        col.add(rows)
    info = memory.update("w", col, 0.9)
    assert info.num_rows == 2 * batches * tokens
    assert 1 <= info.rank_after <= min(dim, info.num_rows)
    assert_orthonormal(memory.basis("w"))


def test_sum_space_trace_weighting_lets_few_prompt_rows_count():
    e = torch.eye(6)
    tokens = 100.0 * torch.randn(1000, 3) @ e[:3]  # many large token rows in span(e0, e1, e2)
    prompts = 0.1 * e[3:4].repeat(2, 1)  # two small prompt rows along e3
    weighted, plain = SubspaceMemory(), SubspaceMemory()
    feature_update(weighted, "w", tokens, 0.9, extra=prompts)
    feature_update(plain, "w", tokens, 0.9, extra=prompts, weighting="sum")

    def along_e3(memory: SubspaceMemory) -> float:
        return float(torch.linalg.vector_norm(memory.basis("w").T @ e[3].double()))

    assert along_e3(weighted) == pytest.approx(1.0)
    assert along_e3(plain) < 1e-6


def test_update_rejects_wrong_mode_collector_and_bad_eps():
    memory = SubspaceMemory("feature")
    with pytest.raises(ValueError, match="reference-mode collector"):
        memory.update("w", SampleCollector(4, 2), 0.5)
    with pytest.raises(ValueError, match="eps"):
        memory.update("w", GramCollector(4), 1.5)


# -------------------------------------------------------------------------------- projector


def test_projection_idempotent_and_orthogonal_to_basis():
    memory = basis_with_rank(16, 5)
    param = nn.Parameter(torch.randn(7, 3, 16))
    projector = Projector([ProtectedGroup("w", "prompt", param)], memory)
    param.grad = torch.randn_like(param)
    projector.project_gradients()
    once = param.grad.clone()
    projector.project_gradients()
    assert torch.allclose(param.grad, once, atol=1e-6)
    u = memory.basis("w").float()
    assert (once @ u).abs().max() < 1e-5
    assert once.norm() > 0


def test_projection_uses_outer_product_when_cheaper_and_matches_thin_path():
    low, high = basis_with_rank(8, 2), basis_with_rank(8, 6)  # 2k < D: two thin matmuls; else U U^T
    for memory in (low, high):
        param = nn.Parameter(torch.randn(4, 8, dtype=torch.float64))
        param.grad = torch.randn_like(param)
        expected = param.grad - param.grad @ memory.basis("w") @ memory.basis("w").T
        Projector([ProtectedGroup("w", "prompt", param)], memory).project_gradients()
        assert torch.allclose(param.grad, expected, atol=1e-12)


def test_no_projection_while_memory_is_empty():
    param = nn.Parameter(torch.randn(4, 8))
    projector = Projector([ProtectedGroup("w", "prompt", param)], SubspaceMemory())
    param.grad = torch.randn_like(param)
    grad = param.grad.clone()
    projector.before_step()
    projector.after_step()
    assert torch.equal(param.grad, grad)
    assert not projector.active()
    assert projector.step_leak() == {}


def _train_adam(target: str, steps: int = 30):
    """Adam on a loss with very different per-coordinate curvature, protected basis of rank 3 in R^8."""
    torch.manual_seed(0)
    memory = basis_with_rank(8, 3, seed=4)
    param = nn.Parameter(torch.randn(6, 8))
    goal = torch.randn(6, 8)
    scale = torch.logspace(-2, 2, 8)
    projector = Projector([ProtectedGroup("w", "prompt", param)], memory, target=target)
    opt = torch.optim.Adam([param], lr=0.05)
    projector.begin_task()
    leaks = []
    for _ in range(steps):
        opt.zero_grad()
        ((param - goal).square() * scale).sum().backward()
        projector.before_step()
        if target == "gradient":
            inside = param.grad @ memory.basis("w").float()
            assert inside.norm() < 1e-6 * param.grad.norm()
        opt.step()
        projector.after_step()
        leaks.append(projector.step_leak()["w"])
    return projector.end_task()["w"], leaks


def test_update_target_keeps_adam_change_out_of_span_while_gradient_target_leaks():
    grad_report, grad_steps = _train_adam("gradient")
    upd_report, upd_steps = _train_adam("update")
    assert grad_report["rank"] == upd_report["rank"] == 3
    assert grad_report["change"] > 0.1 and upd_report["change"] > 0.1
    assert grad_report["leak"] > 1e-3  # Adam's per-coordinate scaling leaves the complement
    assert upd_report["leak"] < 1e-5
    assert all(s["optimizer"] == s["applied"] for s in grad_steps)
    assert max(s["applied"] for s in grad_steps) > 1e-3
    assert max(s["applied"] for s in upd_steps) < 1e-5
    assert max(s["optimizer"] for s in upd_steps) > 1e-3  # what Adam would have leaked


@pytest.mark.parametrize("target", ["gradient", "update"])
def test_full_rank_basis_freezes_the_parameter_exactly_even_under_adam(target):
    """span(U) = R^D: subtracting g U U^T would leave a ~1e-7 rounding residue that Adam rescales into
    full-size steps (its moments start at 0 and see only the residue); the parameter must stay bit-for-bit."""
    torch.manual_seed(0)
    memory = basis_with_rank(4, 4, seed=2)
    param = nn.Parameter(torch.randn(6, 4))
    start = param.detach().clone()
    projector = Projector([ProtectedGroup("w", "lora_b", param)], memory, target=target)
    opt = torch.optim.Adam([param], lr=0.05)
    projector.begin_task()
    for _ in range(5):
        opt.zero_grad()
        (param * torch.randn(6, 4)).sum().backward()
        projector.before_step()
        if target == "gradient":
            assert torch.count_nonzero(param.grad) == 0
        opt.step()
        projector.after_step()
    assert torch.equal(param.detach(), start)
    assert projector.end_task()["w"]["leak"] == 0.0


def test_update_target_without_step_leak_bookkeeping_projects_identically():
    """The engine turns the per-step leak off (measure_step_leak=False): the update projection must be
    the same, bit for bit, only without the norms."""
    finals = []
    for measure in (True, False):
        torch.manual_seed(0)
        memory = basis_with_rank(8, 3, seed=4)
        param = nn.Parameter(torch.randn(6, 8))
        projector = Projector([ProtectedGroup("w", "prompt", param)], memory, target="update",
                              measure_step_leak=measure)
        opt = torch.optim.Adam([param], lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            (param.square() * torch.logspace(-2, 2, 8)).sum().backward()
            projector.before_step()
            opt.step()
            projector.after_step()
        assert bool(projector.step_leak()) == measure
        finals.append(param.detach().clone())
    assert torch.equal(finals[0], finals[1])
    assert float((finals[1] @ memory.basis("w").float()).norm()) > 0  # the start's own component stays


def _adam_steps(param, projector, steps: int = 4) -> torch.Tensor:
    """Adam steps on a coordinate-weighted square loss with ``projector`` around each; the change."""
    opt = torch.optim.Adam([param], lr=0.05)
    start = param.detach().clone()
    for _ in range(steps):
        opt.zero_grad()
        (param.square() * torch.linspace(0.5, 2, param.shape[-1])).sum().backward()
        projector.before_step()
        opt.step()
        projector.after_step()
    return param.detach() - start


def _several_groups_on_one_parameter(param, overlap: bool = False) -> tuple[list[ProtectedGroup], SubspaceMemory]:
    """Per-head-like column blocks of one row-set, a transposed view of the other (its basis full),
    and optionally a group overlapping the first."""
    memory = SubspaceMemory()
    for name, dim, rank in (("h0", 4, 2), ("h1", 4, 3), ("t", 5, 5), ("o", 8, 2)):
        rows = rows_with_spectrum([1.0] * rank, orthonormal(dim, rank, seed=dim + rank), n=rank + 5, seed=rank)
        feature_update(memory, name, rows, 1.0)
    groups = [ProtectedGroup("h0", "k", param, lambda t: t[0, :, :4]), ProtectedGroup("h1", "k", param, lambda t: t[0, :, 4:]),
              ProtectedGroup("t", "v", param, lambda t: t[1].transpose(0, 1))]
    if overlap:
        groups.append(ProtectedGroup("o", "k", param, lambda t: t[0]))
    return groups, memory


def test_update_target_with_several_groups_on_one_parameter():
    """Disjoint groups on one parameter share one snapshot per step (the engine's fast path): the same
    parameters, bit for bit, as one snapshot per group."""
    finals = []
    for measure in (True, False):
        torch.manual_seed(0)
        param = nn.Parameter(torch.randn(2, 5, 8))  # (key / value, L, D)
        groups, memory = _several_groups_on_one_parameter(param)
        projector = Projector(groups, memory, target="update", measure_step_leak=measure)
        assert projector._per_param == (not measure)
        delta = _adam_steps(param, projector)
        assert torch.equal(delta[1], torch.zeros_like(delta[1]))  # the transposed view's basis is full
        for g in groups[:2]:
            u = memory.basis(g.name).float()
            assert float((g.select(delta) @ u).norm()) < 1e-6 * float(g.select(delta).norm())
        finals.append(param.detach().clone())
    assert torch.equal(finals[0], finals[1])


@pytest.mark.parametrize("blocks", [False, True])
def test_overlapping_groups_are_refused(blocks):
    # Undoing one group's in-span part can move the shared elements back into the other's span, so
    # neither would be protected (groups on all of a (4, 8) parameter and on its first two rows, SGD: 0.077
    # of the first group's change stayed inside its span).
    param = nn.Parameter(torch.randn(2, 5, 8))
    if blocks:
        wide = lambda t: t[0]  # noqa: E731
        groups = [ProtectedGroup(n, "k", param, lambda t, c=c: t[0][..., c], block=Block("l0", wide, c))
                  for n, c in (("h0", slice(0, 5)), ("h1", slice(4, 8)))]
    else:
        groups, _ = _several_groups_on_one_parameter(param, overlap=True)
    with pytest.raises(ValueError) as e:
        Projector(groups, SubspaceMemory(), target="update")
    assert "overlap on the same parameter" in str(e.value) and "'h0'" in str(e.value)


def _head_groups(param, blocks: bool) -> tuple[list[ProtectedGroup], SubspaceMemory]:
    """Two 'heads' (columns 0-3, 4-7) of param[0], one with a rank-2 basis and one whose basis is full."""
    memory = SubspaceMemory()
    for name, rank in (("h0", 2), ("h1", 4)):
        rows = rows_with_spectrum([1.0] * rank, orthonormal(4, rank, seed=rank), n=rank + 5, seed=rank)
        feature_update(memory, name, rows, 1.0)
    wide = lambda t: t[0]  # noqa: E731
    groups = [ProtectedGroup(name, "k", param, lambda t, c=cols: t[0][..., c], block=Block("l0", wide, cols) if blocks else None)
              for name, cols in (("h0", slice(0, 4)), ("h1", slice(4, 8)))]
    return groups, memory


@pytest.mark.parametrize("target", ["gradient", "update"])
def test_block_groups_are_projected_together_as_each_alone(target):
    """Block siblings (per-head bases) applied as one block-diagonal projection: the same parameters as
    one projection per group (to float rounding), the full block's part held exactly."""
    finals = []
    for blocks in (False, True):
        torch.manual_seed(0)
        param = nn.Parameter(torch.randn(2, 5, 8))
        groups, memory = _head_groups(param, blocks)
        projector = Projector(groups, memory, target=target, measure_step_leak=False)
        assert len(projector._units) == (1 if blocks else 2)
        delta = _adam_steps(param, projector)
        u = memory.basis("h0").float()
        if target == "update":
            assert torch.equal(delta[0, :, 4:], torch.zeros(5, 4))  # full block: exactly undone
            assert float((delta[0, :, :4] @ u).norm()) < 1e-6 * float(delta[0, :, :4].norm())
        assert float(delta[1].norm()) > 0  # outside every group: free
        finals.append(param.detach().clone())
    torch.testing.assert_close(finals[0], finals[1], atol=1e-6, rtol=0)


def test_block_groups_zero_a_full_blocks_gradient_exactly():
    param = nn.Parameter(torch.randn(2, 5, 8))
    groups, memory = _head_groups(param, True)
    param.grad = torch.randn(2, 5, 8)
    expected = param.grad.clone()
    u = memory.basis("h0").float()
    expected[0, :, :4] -= expected[0, :, :4] @ u @ u.T
    expected[0, :, 4:] = 0
    Projector(groups, memory).project_gradients()
    assert torch.equal(param.grad[0, :, 4:], torch.zeros(5, 4))
    torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=0)


def test_a_block_must_be_the_groups_own_columns():
    param = nn.Parameter(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"block.view\(t\)\[..., block.cols\]"):
        ProtectedGroup("h0", "k", param, lambda t: t[0][..., :4], block=Block("l0", lambda t: t[0], slice(4, 8)))


def test_view_protects_only_the_selected_slice():
    dim = 8
    memory = basis_with_rank(dim, 3)
    u = memory.basis("w").float()
    param = nn.Parameter(torch.randn(3, 2, 4, dim))  # (M, 2, L, D): key half, value half
    group = ProtectedGroup("w", "prompt", param, view=lambda t: t[:, 0])
    weights = torch.randn(3, 2, 4, dim)
    for target in ("gradient", "update"):
        start = param.detach().clone()
        projector = Projector([group], memory, target=target)
        opt = torch.optim.Adam([param], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            (param * weights).sum().backward()
            projector.before_step()
            if target == "gradient":
                assert torch.equal(param.grad[:, 1], weights[:, 1])  # value half untouched
                assert (param.grad[:, 0] @ u).abs().max() < 1e-5
            opt.step()
            projector.after_step()
        delta = param.detach() - start
        assert (delta[:, 1] @ u).abs().max() > 1e-2  # the value half moves freely
        if target == "update":
            assert (delta[:, 0] @ u).abs().max() < 1e-5


def test_view_that_copies_is_rejected():
    param = nn.Parameter(torch.randn(4, 8))
    with pytest.raises(ValueError, match="view"):
        ProtectedGroup("w", "prompt", param, view=lambda t: t[[0, 2]])


def test_projector_acts_by_reference_through_a_renaming_wrapper():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.randn(5, 8))

        def forward(self, inp):
            return (inp @ self.x.T).square().sum()

    class Wrapper(nn.Module):  # like DistributedDataParallel: parameters become 'module.x'
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp):
            return self.module(inp)

    inner = Inner()
    model = Wrapper(inner)
    assert [n for n, _ in model.named_parameters()] == ["module.x"]
    memory = basis_with_rank(8, 4)
    projector = Projector([ProtectedGroup("w", "prompt", inner.x)], memory)
    model(torch.randn(3, 8)).backward()
    projector.before_step()
    param = dict(model.named_parameters())["module.x"]
    assert param.grad.norm() > 0
    assert (param.grad @ memory.basis("w").float()).abs().max() < 1e-5


def test_duplicate_group_names_are_rejected():
    a, b = nn.Parameter(torch.randn(2, 4)), nn.Parameter(torch.randn(2, 4))
    with pytest.raises(ValueError, match="unique"):
        Projector([ProtectedGroup("w", "k", a), ProtectedGroup("w", "k", b)], SubspaceMemory())


# -------------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_with_weights_only_load():
    memory = basis_with_rank(8, 3)
    feature_update(memory, "other", torch.randn(20, 8), 0.5)
    buf = io.BytesIO()
    torch.save(memory.state_dict(), buf)
    buf.seek(0)
    restored = SubspaceMemory()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("w", "other"):
        assert torch.equal(restored.basis(name), memory.basis(name))
    param = nn.Parameter(torch.randn(4, 8))
    grads = []
    for mem in (memory, restored):
        param.grad = torch.ones_like(param)
        Projector([ProtectedGroup("w", "prompt", param)], mem).project_gradients()
        grads.append(param.grad.clone())
    assert torch.equal(grads[0], grads[1])
    with pytest.raises(CheckpointError, match="pgp.mode"):
        SubspaceMemory("reference").load_state_dict(memory.state_dict())


def test_projector_refreshes_after_memory_changes():
    param = nn.Parameter(torch.randn(4, 8))
    memory = basis_with_rank(8, 2)
    projector = Projector([ProtectedGroup("w", "prompt", param)], memory)
    param.grad = torch.randn_like(param)
    projector.project_gradients()
    feature_update(memory, "w", torch.randn(30, 8), 0.99)
    param.grad = torch.randn_like(param)
    projector.project_gradients()
    assert (param.grad @ memory.basis("w").float()).abs().max() < 1e-5


# -------------------------------------------------------------------------------- reference mode


def np_pca(x: np.ndarray, n: int) -> np.ndarray:
    """sklearn 1.3 PCA(n).fit_transform with the full solver: centred SVD, u-based sign flip."""
    xc = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), range(u.shape[1])])
    vt = vt * signs[:, None]
    return xc @ vt[:n].T


def np_update_memory(rep: np.ndarray, threshold: float, feature=None) -> np.ndarray:
    """The released update rule, restated plainly."""
    rep = rep @ rep.T
    if feature is None:
        u, s, _ = np.linalg.svd(rep, full_matrices=False)
        ratio = s**2 / (s**2).sum()
        return u[:, : int(np.sum(np.cumsum(ratio) < threshold))]
    total = (np.linalg.svd(rep, compute_uv=False) ** 2).sum()
    act_hat = rep - feature @ feature.T @ rep
    u, s, _ = np.linalg.svd(act_hat, full_matrices=False)
    accumulated = (total - (s**2).sum()) / total
    r = 0
    for ratio in s**2 / total:
        if accumulated >= threshold:
            break
        accumulated += ratio
        r += 1
    return np.hstack([feature, u[:, :r]])


def _structured(n: int, f: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 8)) * np.geomspace(3, 0.3, 8)) @ rng.standard_normal((8, f))


def test_reference_mode_equals_released_arithmetic():
    dim, tokens = 16, 3
    prompt = nn.Parameter(torch.randn(6, dim))  # the "prompt pool", (m, D)
    key = nn.Parameter(torch.randn(4, dim))
    groups = [
        ProtectedGroup("prompt", "prompt", prompt, components=4),
        ProtectedGroup("key", "key", key, components=5),
    ]
    pgp = PGP(groups, PGPConfig(mode="reference", num_samples=dim), {"prompt": 0.9, "key": 0.97})
    ref_prompt = ref_key = None
    for task in range(3):
        x = _structured(dim, tokens * dim, seed=task)  # one row per sample: 3 tokens flattened
        q = _structured(dim, dim, seed=10 + task)
        pool = _structured(6, dim, seed=20 + task)
        for half in (slice(0, 7), slice(7, dim)):  # two batches
            pgp.collect(
                {
                    "prompt": torch.tensor(x[half]).reshape(-1, tokens, dim).float(),
                    "key": torch.tensor(q[half]).float(),
                }
            )
        rep = np_pca(x.astype(np.float32).astype(np.float64), 4)
        if task > 0:  # as released for L2P: the prompt term from the second task on
            pgp.collect_extra("prompt", torch.tensor(pool).float())
            rep = rep + np_pca(pool.astype(np.float32).astype(np.float64).T, 4)
        infos = pgp.build()
        ref_prompt = np_update_memory(rep, 0.9, ref_prompt)
        ref_key = np_update_memory(np_pca(q.astype(np.float32).astype(np.float64), 5), 0.97, ref_key)
        for name, ref in (("prompt", ref_prompt), ("key", ref_key)):
            ours = pgp.memory.basis(name).numpy()
            assert ours.shape == ref.shape, (task, name)
            assert infos[name].rank_after == ref.shape[1]
            assert np.allclose(ours @ ours.T, ref @ ref.T, atol=1e-6), (task, name)
    assert 0 < pgp.memory.rank("prompt") < dim and pgp.memory.rank("key") > 0


def test_reference_first_task_keeps_strictly_below_eps():
    # sigma(R) = (2, 1): sigma^4 ratios 16/17 and 1/17. eps 0.5: the top direction crosses 0.5, so
    # the released criterion keeps nothing; feature mode (sigma^2, reach eps) keeps one direction.
    rep = torch.zeros(4, 2, dtype=torch.float64)
    rep[0, 0], rep[1, 1] = 2.0, 1.0
    assert first_basis(rep, 0.5).shape == (4, 0)
    assert first_basis(rep, 0.95).shape == (4, 1)
    memory = SubspaceMemory()
    assert feature_update(memory, "w", rep.T, 0.5).rank_after == 1


def test_reference_mode_needs_num_samples_equal_dim():
    param = nn.Parameter(torch.randn(10, 5, 768))
    groups = [ProtectedGroup("prompt", "prompt", param, components=9)]
    with pytest.raises(ConfigError) as err:
        PGP(groups, PGPConfig(mode="reference", num_samples=500), {"prompt": 0.5})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (
        "pgp.mode=reference needs pgp.num_samples == embed dim (768), got 500; "
        "use pgp.mode=feature or set pgp.num_samples=768"
    )


def test_reference_mode_rejects_a_short_sample_at_build():
    param = nn.Parameter(torch.randn(3, 8))
    pgp = PGP(
        [ProtectedGroup("p", "prompt", param, components=2)],
        PGPConfig(mode="reference", num_samples=8),
        {"prompt": 0.5},
    )
    pgp.collect({"p": torch.randn(5, 2, 8)})  # the task had only 5 images
    with pytest.raises(ConfigError, match="num_samples"):
        pgp.build()


# -------------------------------------------------------------------------------- facade


def test_facade_builds_only_the_groups_it_was_asked_to():
    a, b = nn.Parameter(torch.randn(3, 8)), nn.Parameter(torch.randn(3, 8))
    pgp = PGP([ProtectedGroup("a", "w", a), ProtectedGroup("b", "w", b)], PGPConfig(), {"w": 0.9})
    pgp.collectors(["b"])
    with pytest.raises(KeyError, match="no protected group named 'a'"):
        pgp.collect({"a": torch.randn(4, 8)})  # not asked for: its rows would be lost silently
    pgp.collect({"b": torch.randn(4, 8)})
    assert set(pgp.build()) == {"b"} and pgp.ranks()["a"] == 0 < pgp.ranks()["b"]
    pgp.collectors(["a", "b"])
    pgp.collect({"a": torch.randn(4, 8)})
    with pytest.raises(RuntimeError, match="no representations collected for group"):
        pgp.build()  # every group asked for needs rows
    with pytest.raises(KeyError, match="no protected group named 'c'"):
        pgp.collectors(["c"])


def test_facade_resolves_eps_and_runs_a_task_cycle():
    prompt = nn.Parameter(torch.randn(10, 5, 12))
    key = nn.Parameter(torch.randn(10, 12))
    groups = [ProtectedGroup("prompt", "prompt", prompt), ProtectedGroup("key", "key", key)]
    pgp = PGP(groups, PGPConfig(eps={"key": 0.8}, target="update"), {"prompt": 0.5, "key": 0.97})
    assert {g.name: g.eps for g in pgp.groups} == {"prompt": 0.5, "key": 0.8}
    opt = torch.optim.Adam([prompt, key], lr=0.1)
    for task in range(2):
        pgp.begin_task()
        for _ in range(3):
            opt.zero_grad()
            (prompt.sin().sum() + key.cos().sum()).backward()
            pgp.before_step()
            opt.step()
            pgp.after_step()
        report = pgp.end_task()
        if task == 1:
            assert all(r["leak"] < 1e-5 and r["rank"] > 0 for r in report.values())
        pgp.collectors()
        pgp.collect({"prompt": torch.randn(4, 7, 12), "key": torch.randn(4, 12)})
        pgp.collect_extra("prompt", prompt.detach())
        infos = pgp.build()
        assert infos["key"].energy_captured >= 0.8 - 1e-9
    assert all(r > 0 for r in pgp.ranks().values())
    with pytest.raises(ConfigError, match="pgp.eps.value"):
        PGP([ProtectedGroup("v", "value", key)], PGPConfig(), {"prompt": 0.5})
    pgp.collect({"prompt": torch.randn(2, 12)})
    with pytest.raises(RuntimeError, match="key"):
        pgp.build()  # a group without representations would silently stay unprotected
    with pytest.raises(KeyError):
        pgp.collect({"nope": torch.randn(2, 12)})


@pytest.mark.parametrize("target", ["gradient", "update"])
def test_half_precision_parameters_are_projected_in_float32(target):
    memory = basis_with_rank(8, 3)
    # Starting at 0, the stored result's bf16 rounding is ~2^-9 of the change itself; from randn values
    # it was ~2% of a 0.1-sized change, right at the bound, and the test passed or failed by RNG state.
    param = nn.Parameter(torch.zeros(4, 8, dtype=torch.bfloat16))
    projector = Projector([ProtectedGroup("w", "prompt", param)], memory, target=target)
    opt = torch.optim.SGD([param], lr=0.1)
    start = param.detach().float().clone()
    param.grad = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    projector.before_step()
    opt.step()
    projector.after_step()
    delta = param.detach().float() - start
    assert delta.norm() > 0
    assert (delta @ memory.basis("w").float()).norm() < 2e-2 * delta.norm()  # bf16 rounding only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_collect_update_and_project():
    dev = torch.device("cuda")
    param = nn.Parameter(torch.randn(10, 5, 32, device=dev))
    pgp = PGP([ProtectedGroup("p", "prompt", param)], PGPConfig(target="update"), {"prompt": 0.9})
    pgp.collect({"p": torch.randn(16, 20, 32, device=dev)})
    pgp.collect_extra("p", param.detach())
    assert pgp.build()["p"].rank_after > 0
    opt = torch.optim.Adam([param], lr=0.1)
    pgp.begin_task()
    for _ in range(3):
        opt.zero_grad()
        param.sin().sum().backward()
        pgp.before_step()
        opt.step()
        pgp.after_step()
    assert pgp.end_task()["p"]["leak"] < 1e-5


def test_a_slice_of_a_parameter_is_refused_as_param():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="must be the parameter itself"):
        ProtectedGroup("w", "w", lin.weight[:2])  # its .grad stays None: nothing would be projected


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_representations_are_one_line_errors(bad):
    from pgpcl.errors import PgpclError

    rows = torch.randn(10, 6, dtype=torch.float64)
    rows[3, 2] = bad
    for extra in (None, torch.randn(4, 6)):
        with pytest.raises(PgpclError, match="representations of protected group 'w' hold NaN or infinite"):
            feature_update(SubspaceMemory(), "w", rows, 0.9, extra=extra)


def test_a_tiny_eps_still_asks_for_the_first_direction():
    rows = rows_with_spectrum(ENERGIES, orthonormal(6, 4, seed=0))
    for eps in (1e-12, 1e-9, 1e-6):
        memory = SubspaceMemory()
        feature_update(memory, "w", rows, eps)
        assert memory.rank("w") == 1, eps


def test_eps_one_keeps_every_measurable_direction_and_drops_a_tail_under_the_slack():
    # eps = 1 stops at 1 - 1e-9 of the energy: a share of 1e-8 is kept, a tail of 1.1e-10 is not.
    rows = rows_with_spectrum([1.0, 1e-8, 1e-10, 1e-11], orthonormal(6, 4, seed=2), n=10)
    memory = SubspaceMemory()
    info = feature_update(memory, "w", rows, 1.0)
    assert info.rank_after == 2
    assert 1.0 - info.energy_captured == pytest.approx(1.1e-10, rel=1e-3)
    # Growing with the same data adds nothing and duplicates nothing.
    assert feature_update(memory, "w", rows, 1.0).rank_after == 2
    assert_orthonormal(memory.basis("w"))
    # Without the tail every direction is needed and kept.
    full = SubspaceMemory()
    assert feature_update(full, "w", rows_with_spectrum([1.0, 1e-8, 5e-9], orthonormal(6, 3, seed=3)), 1.0).rank_after == 3


def _pgp_with(param, name: str = "w") -> PGP:
    return PGP([ProtectedGroup(name, "w", param, eps=0.9)], PGPConfig(enabled=True))


@pytest.mark.parametrize(
    "edit, phrase",
    [
        (lambda st: {**st, "bases": {"v": st["bases"]["w"]}}, "basis for group 'v', which this method does not declare"),
        (lambda st: {**st, "bases": {"w": torch.zeros(12, 2, dtype=torch.float64)}}, "is 12-D, the group is 8-D"),
        (lambda st: {**st, "bases": {"w": torch.ones(8, 2, dtype=torch.float64)}}, "is not orthonormal"),
        (lambda st: {**st, "bases": {"w": torch.full((8, 2), float("nan"), dtype=torch.float64)}}, "not finite"),
        (lambda st: {"format": st["format"], "mode": st["mode"]}, "not a mapping with 'bases'"),
        (lambda st: {**st, "bases": {"w": [[1.0, 0.0]]}}, "has shape list"),
    ],
)
def test_loading_a_pgp_state_checks_it_against_the_groups(edit, phrase):
    param = nn.Parameter(torch.randn(5, 8))
    source = _pgp_with(param)
    source.memory = basis_with_rank(8, 2)
    state = source.memory.state_dict()
    fresh = _pgp_with(nn.Parameter(torch.randn(5, 8)))
    fresh.load_state_dict(state)  # the untouched state loads
    assert fresh.ranks() == {"w": 2}
    with pytest.raises(CheckpointError) as e:
        _pgp_with(nn.Parameter(torch.randn(5, 8))).load_state_dict(edit(state))
    assert phrase in str(e.value)


def test_a_group_over_a_tensor_nothing_trains_says_to_give_the_parameter():
    buffer = torch.zeros(3, 4)  # e.g. a registered buffer, or a parameter's .detach()
    with pytest.raises(ValueError, match=r"group 'w': param does not require grad \(a buffer, a detached tensor "
                                         r"or a frozen parameter\).*give the trainable nn.Parameter itself"):
        ProtectedGroup("w", "prompt", buffer)
