"""Protected parameter groups: what the projection acts on.

A method declares one :class:`ProtectedGroup` per (parameter, protected part, representation
source). The group holds the parameter *by reference*: the projection never looks a parameter up by
name, so wrappers that rename parameters (DistributedDataParallel's ``module.`` prefix, compile,
FSDP-style wrappers) cannot silently switch it off, as they did in the released code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

View = Callable[[Tensor], Tensor]


def shares_storage(view: Tensor, base: Tensor) -> bool:
    """True when ``view`` is a view into ``base``'s memory (so in-place writes reach ``base``)."""
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@dataclass(frozen=True)
class Block:
    """Marks a group as one column block of a wider view of its parameter (one attention head's columns
    of a key-prefix, say). Groups with the same ``key`` keep their own bases, ranks and leaks, but the
    projector applies them together, as one block-diagonal projection of ``view``: a few tensor
    operations per step for all of them instead of a few per group."""

    key: str
    view: View
    """The wider view (..., D_all) the blocks are columns of; a view, as ``ProtectedGroup.view``."""
    cols: slice
    """This group's columns of it: the group's own view is ``view(t)[..., cols]``."""


@dataclass(eq=False)
class ProtectedGroup:
    """One protected part of one parameter, with its own basis in the subspace memory.

    ``view`` maps a tensor shaped like ``param`` (the parameter, its gradient or a change of it) to
    a *view* (..., D) of the protected part, feature axis last; it must use basic indexing, select,
    or reshapes that do not copy (e.g. ``lambda t: t[:, 0]`` for the key half of a (M, 2, L, D)
    prefix tensor), because the projection writes through it. None = the whole tensor, whose last
    axis is then the feature axis.
    """

    name: str
    """Unique key of the group's basis in the memory and in checkpoints, e.g. 'prompt', 'g_key.l0'."""
    kind: str
    """Eps lookup key, e.g. 'prompt' or 'key' (``pgp.eps.<kind>`` in the config)."""
    param: Tensor
    """The parameter, held by reference."""
    view: View | None = None
    eps: float | None = None
    """Energy threshold in (0, 1]; None = resolved from the config by the :class:`PGP` facade."""
    components: int | None = None
    """Reference mode only: PCA width of the released arithmetic (L2P 9 prompt / 5 key, DualPrompt
    50, CLIP 5)."""
    block: Block | None = None
    """Set when the group is a column block projected together with its siblings (see :class:`Block`)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ProtectedGroup.name must be a non-empty string")
        if not isinstance(self.param, Tensor):
            raise TypeError(f"group '{self.name}': param must be a tensor, got {type(self.param).__name__}")
        if not self.param.requires_grad:
            raise ValueError(f"group '{self.name}': param does not require grad (a buffer, a detached tensor or a "
                             "frozen parameter), so nothing trains it and there is nothing to protect; give the "
                             "trainable nn.Parameter itself")
        if not self.param.is_leaf:
            # a slice such as lin.weight[:2] never receives a .grad: gradient projection would do nothing
            raise ValueError(
                f"group '{self.name}': param must be the parameter itself (a leaf tensor); "
                "to protect part of it, pass the parameter and a view="
            )
        if self.eps is not None and not 0.0 < self.eps <= 1.0:
            raise ValueError(f"group '{self.name}': eps must be in (0, 1], got {self.eps}")
        if self.components is not None and self.components < 1:
            raise ValueError(f"group '{self.name}': components must be >= 1, got {self.components}")
        data = self.param.detach()
        selected = self.select(data)
        if selected.dim() < 1 or selected.shape[-1] < 1:
            raise ValueError(f"group '{self.name}': view gives shape {tuple(selected.shape)}, need (..., D)")
        if self.view is not None and not shares_storage(selected, data):
            raise ValueError(
                f"group '{self.name}': view must return a view of its input (basic slicing, select, "
                "non-copying reshape), not a copy; writes through a copy would be lost"
            )
        if self.block is not None:
            wide = self.block.view(data)
            part = wide[..., self.block.cols]
            if not shares_storage(wide, data) or (part.shape, part.stride(), part.storage_offset()) != (
                selected.shape, selected.stride(), selected.storage_offset()
            ):
                raise ValueError(
                    f"group '{self.name}': its view must be block.view(t)[..., block.cols], a view"
                )

    def select(self, t: Tensor) -> Tensor:
        """The protected part of ``t`` (shaped like ``param``) as a view (..., D)."""
        return t if self.view is None else self.view(t)

    @property
    def dim(self) -> int:
        """D, the length of the feature axis of the protected part."""
        return int(self.select(self.param.detach()).shape[-1])

    def selected_data(self) -> Tensor:
        """The protected part of the parameter's current value (a view, no autograd)."""
        return self.select(self.param.detach())

    def selected_grad(self) -> Tensor | None:
        """The protected part of the parameter's gradient (a view), or None without a gradient."""
        grad = self.param.grad
        if grad is None:
            return None
        selected = self.select(grad)
        if self.view is not None and not shares_storage(selected, grad):
            # A gradient can have other strides than its parameter (e.g. set by hand); projecting a
            # copy would silently do nothing, so refuse.
            raise RuntimeError(f"group '{self.name}': view copied the gradient (strides {grad.stride()})")
        return selected


def check_unique(groups: list[ProtectedGroup]) -> None:
    """Raise ValueError when two groups share a name (their bases would overwrite each other)."""
    seen: set[str] = set()
    for g in groups:
        if g.name in seen:
            raise ValueError(f"two protected groups are named '{g.name}'; names must be unique")
        seen.add(g.name)


@torch.no_grad()
def snapshot(group: ProtectedGroup) -> Tensor:
    """A detached copy of the protected part of the parameter, (..., D)."""
    return group.selected_data().clone()
