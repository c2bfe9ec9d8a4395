"""The released code's arithmetic (``pgp.mode=reference``), to compare with published numbers.

Written from the description in docs/pgp.md ("reference mode"); in short, per group and task:

1. samples X (N, F): each sample's token rows flattened (F = n * D);
2. R = PCA_c(X) (N, c): centred over samples, exact, sklearn-1.3 sign convention (below);
3. sum space: if an extra matrix P (m, D) is given, R += PCA_c(P^T) (D, c); needs N == D;
4. G = R R^T (N, N); energies = squared singular values of G (= sigma^4 of R);
5. first update: keep the top r left singular vectors of G with r = #{i: cumsum(ratio)_i < eps}
   (strictly below: the direction that crosses eps is NOT kept);
   later updates (GPM): total = ||G||_F^2, residual A = G - F F^T G, explained = (total -
   ||A||_F^2) / total, then add the left singular vectors of A, largest first, while the running
   fraction is still < eps (here the crossing direction IS kept);
6. the basis F (N, k) is indexed by samples and applied along the embedding axis, so it only makes
   sense when N == D.

Sign convention: step 3 adds the i-th component of one PCA to the i-th of another, so the sign of each
PCA column changes the sum space (it does not matter for a single PCA, whose span is sign-free).
sklearn 1.3 (the released requirement) flips each component so that the largest-magnitude entry of
its score column is positive (``svd_flip`` with ``u_based_decision=True``); so do we. The released
runs used sklearn's randomized solver for wide matrices, which approximates the same components.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgpcl.errors import ConfigError
from pgpcl.projection.linalg import extend_orthonormal

_CHUNK_BYTES = 1 << 27  # float64 working set of one feature chunk when forming the sample Gram


def check_sample_count(num_samples: int, dim: int) -> None:
    """Reference mode applies a sample-indexed basis along the embedding axis: needs N == D."""
    if num_samples != dim:
        raise ConfigError(
            f"pgp.mode=reference needs pgp.num_samples == embed dim ({dim}), got {num_samples}; "
            f"use pgp.mode=feature or set pgp.num_samples={dim}"
        )


def _sample_gram(x: Tensor) -> Tensor:
    """X X^T (N, N) float64 on CPU, formed over feature chunks so the float64 copy stays small."""
    n, f = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK_BYTES // (8 * max(n, 1)))
    for start in range(0, f, step):
        block = x[:, start : start + step].to(torch.float64)
        gram.addmm_(block, block.T)
    return gram.cpu()


def _flip_signs(scores: Tensor) -> Tensor:
    """Make the largest-magnitude entry of every column positive (sklearn 1.3 ``svd_flip``)."""
    idx = scores.abs().argmax(dim=0)
    signs = torch.sign(scores[idx, torch.arange(scores.shape[1])])
    signs[signs == 0] = 1.0
    return scores * signs


def pca_scores(x: Tensor, components: int) -> Tensor:
    """Exact PCA over the rows of x (N, F): the centred data's scores on the top components, (N, c).

    Uses whichever of the covariance (F, F) or the centred sample Gram (N, N) is smaller; both give
    the same scores U_c S_c of the SVD of the centred data.
    """
    n, f = x.shape
    if components > min(n, f):
        raise ConfigError(
            f"pgp.mode=reference: PCA to {components} components needs at least {components} samples "
            f"and features, got a {n} x {f} matrix"
        )
    if f <= n:
        xc = x.to(torch.float64).cpu()
        xc = xc - xc.mean(dim=0, keepdim=True)
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        scores = xc @ vecs.flip(1)[:, :components]
    else:
        gram = _sample_gram(x)
        # Centre the Gram instead of the data: H X X^T H with H = I - 11^T / N.
        gram = gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()
        vals, vecs = torch.linalg.eigh((gram + gram.T) / 2)
        vals, vecs = vals.flip(0)[:components], vecs.flip(1)[:, :components]
        scores = vecs * vals.clamp_min(0.0).sqrt()
    return _flip_signs(scores)


def sum_space(samples: Tensor, extra: Tensor | None, components: int) -> Tensor:
    """R (N, c) float64: PCA of the samples, plus the PCA of the transposed extra matrix if given.

    samples: (N, F); extra: (m, D) with D == N (the released code adds a (D, c) matrix to an (N, c)
    one, which only type-checks for N == D).
    """
    rep = pca_scores(samples, components)
    if extra is None:
        return rep
    if extra.shape[1] != rep.shape[0]:
        check_sample_count(rep.shape[0], extra.shape[1])
    return rep + pca_scores(extra.T, components)


def _left_vectors(mat: Tensor, total: float) -> tuple[Tensor, Tensor]:
    """Left singular vectors of ``mat`` (columns) and their squared singular values / total."""
    u, s, _ = torch.linalg.svd(mat, full_matrices=False)
    return u, s.square() / total


def _gram(rep: Tensor) -> tuple[Tensor, float]:
    """G = R R^T (N, N) and its sigma^4 energy ||G||_F^2 (the sum of G's squared singular values)."""
    gram = rep @ rep.T
    return gram, float(gram.square().sum())


def first_basis(rep: Tensor, eps: float) -> Tensor:
    """First task: U[:, :r] of SVD(R R^T), r = #{cumulative sigma^4 ratio strictly below eps}."""
    return _first_basis(*_gram(rep), eps)


def _first_basis(gram: Tensor, total: float, eps: float) -> Tensor:
    if total <= 0.0:
        return gram.new_zeros(gram.shape[0], 0)
    u, ratio = _left_vectors(gram, total)
    r = int((torch.cumsum(ratio, 0) < eps).sum())
    return u[:, :r]


def _grow_basis(gram: Tensor, total: float, basis: Tensor, eps: float) -> Tensor:
    """Later tasks: the released GPM step on G = R R^T; returns the grown basis (N, k')."""
    if total <= 0.0:
        return basis
    resid = gram - basis @ (basis.T @ gram)
    u, ratio = _left_vectors(resid, total)
    explained = (total - float(resid.square().sum())) / total
    # The released loop adds direction i while the fraction accumulated BEFORE it is < eps.
    before = explained + torch.cumsum(ratio, 0) - ratio
    r = int((before < eps).sum())
    # Left singular vectors for non-zero singular values are orthogonal to the basis already; the
    # re-orthogonalisation only drops duplicates in degenerate cases (e.g. eps = 1, null directions),
    # where the released code would produce a non-orthonormal basis.
    return extend_orthonormal(basis, u[:, :r]) if r > 0 else basis


def reference_update(rep: Tensor, basis: Tensor | None, eps: float) -> tuple[Tensor, float, float]:
    """One released memory update. rep: R (N, c) float64; basis: None before the first update.

    Returns (basis (N, k), fraction explained before, fraction captured after), fractions of the
    sigma^4 energy ||F^T R R^T||_F^2 / ||R R^T||_F^2.
    """
    gram, total = _gram(rep)
    if basis is None:
        new, before = _first_basis(gram, total, eps), 0.0
    else:
        new = _grow_basis(gram, total, basis, eps)
        before = float((basis.T @ gram).square().sum()) / total if total > 0 else 0.0
    after = float((new.T @ gram).square().sum()) / total if total > 0 else 0.0
    return new, before, after
