"""Small float64 linear algebra shared by both memory modes."""

from __future__ import annotations

import torch
from torch import Tensor

# Relative slack on the energy target: a cumulative fraction within REACH_TOL of eps counts as having
# reached it, so boundary cases (eps exactly equal to a cumulative ratio) do not depend on rounding.
# At eps = 1 this leaves out a tail that carries under 1e-9 of the energy, on purpose: protecting it
# gains nothing measurable and can freeze a parameter (docs/pgp.md, section 4).
REACH_TOL = 1e-9
# Eigenvalues below NULL_TOL * total energy are numerically zero; their eigenvectors are arbitrary and
# are never added to a basis.
NULL_TOL = 1e-12
# A new direction keeps less than this norm after removing its part in the basis: a duplicate.
DUPLICATE_NORM = 0.5
# A block of candidate directions whose Gram differs from I by at most this is treated as orthonormal.
ORTHO_TOL = 1e-12


def empty_basis(dim: int) -> Tensor:
    return torch.zeros(dim, 0, dtype=torch.float64)


def energy_in_span(basis: Tensor, gram: Tensor) -> float:
    """tr(U^T G U): energy of the rows behind Gram ``gram`` (D, D) inside span(``basis``) (D, k)."""
    if basis.shape[1] == 0:
        return 0.0
    return float((basis * (gram @ basis)).sum())


def residual_spectrum(basis: Tensor, gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-pairs of the Gram of the residual R - R U U^T, largest first.

    gram: (D, D) = R^T R; basis U: (D, k) orthonormal. Returns eigenvalues (D,) >= 0 and
    eigenvectors (D, D) as columns.
    """
    resid = gram
    if basis.shape[1] > 0:
        comp = torch.eye(gram.shape[0], dtype=gram.dtype) - basis @ basis.T
        resid = comp @ gram @ comp
    resid = (resid + resid.T) / 2  # exact symmetry for eigh
    vals, vecs = torch.linalg.eigh(resid)
    return vals.flip(0).clamp_min(0.0), vecs.flip(1)


def directions_to_reach(explained: float, added: Tensor, total: float, eps: float) -> int:
    """Smallest r with (explained + added[:r].sum()) / total >= eps (within REACH_TOL).

    added: (n,) energies of candidate directions, largest first, all non-null. Returns at most n.
    """
    target = eps * (1.0 - REACH_TOL)  # relative: a tiny eps still asks for the first direction
    if explained / total >= target or added.numel() == 0:
        return 0
    captured = (explained + torch.cumsum(added, 0)) / total
    below = int((captured < target).sum())
    return min(below + 1, added.numel())


def extend_orthonormal(basis: Tensor, new: Tensor) -> Tensor:
    """Append the columns of ``new`` (D, r) to orthonormal ``basis`` (D, k), Gram-Schmidt style.

    Each column is orthogonalised twice against the growing basis (once is not enough in floating
    point) and dropped when less than DUPLICATE_NORM of it is new. Never exceeds D columns.
    """
    fast = _extend_block(basis, new)
    if fast is not None:
        return fast
    cols = [basis]
    current = basis
    for j in range(new.shape[1]):
        if current.shape[1] >= current.shape[0]:
            break
        v = new[:, j : j + 1]
        for _ in range(2):
            v = v - current @ (current.T @ v)
        norm = float(torch.linalg.vector_norm(v))
        if norm < DUPLICATE_NORM:
            continue
        cols.append(v / norm)
        current = torch.cat(cols, dim=1)
    return current


def _extend_block(basis: Tensor, new: Tensor) -> Tensor | None:
    """The common case of :func:`extend_orthonormal` in a few matrix products, or None.

    ``grow_basis`` passes eigenvectors of the residual Gram: orthonormal, and orthogonal to the
    basis up to rounding. Removing span(basis) from all of them at once (twice) then leaves a block
    that is still orthonormal to within ORTHO_TOL, for which the column-by-column Gram-Schmidt would
    only renormalise each column; that is done here. None (use the loop) for any other block, or
    when the basis would exceed D columns.
    """
    k, r = basis.shape[1], new.shape[1]
    if r == 0 or k + r > basis.shape[0]:
        return None
    v = new
    for _ in range(2):
        v = v - basis @ (basis.T @ v)
    off = v.T @ v - torch.eye(r, dtype=v.dtype)
    if float(off.abs().max()) > ORTHO_TOL:
        return None
    return torch.cat([basis, v / torch.linalg.vector_norm(v, dim=0, keepdim=True)], dim=1)


def grow_basis(basis: Tensor, gram: Tensor, eps: float) -> tuple[Tensor, float, float]:
    """GPM step in feature space (energy = sigma^2 of R, i.e. eigenvalues of the Gram).

    basis: (D, k) orthonormal, k may be 0; gram: (D, D) float64 PSD, = R^T R of this task's rows.
    Adds residual eigenvectors, largest first, until (explained + added) / total >= eps; adds nothing
    if already reached. Returns (new basis, fraction explained before, fraction captured after).
    """
    total = float(torch.trace(gram))
    if total <= 0.0:
        return basis, 0.0, 0.0
    explained = energy_in_span(basis, gram)
    vals, vecs = residual_spectrum(basis, gram)
    nonnull = int((vals > NULL_TOL * total).sum())
    room = gram.shape[0] - basis.shape[1]
    r = min(directions_to_reach(explained, vals[:nonnull], total, eps), room)
    new_basis = extend_orthonormal(basis, vecs[:, :r]) if r > 0 else basis
    return new_basis, explained / total, energy_in_span(new_basis, gram) / total
