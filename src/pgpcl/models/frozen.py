"""Helpers for wrappers around a frozen backbone: mode switching, choosing blocks to wrap."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn


def chosen_blocks(blocks: Sequence[nn.Module], indices: Iterable[int]) -> list[tuple[int, nn.Module]]:
    """(index, block) of ``blocks`` (a ViT's ``blocks``, a CLIP tower's ``resblocks``) for each of
    ``indices``; ValueError naming one that does not exist."""
    indices = list(indices)
    check_blocks_exist(indices, len(blocks))
    return [(i, blocks[i]) for i in indices]


def check_blocks_exist(indices: Iterable[int], depth: int) -> None:
    """ValueError naming the first of ``indices`` that is not a block of a ``depth``-block backbone."""
    bad = next((i for i in indices if not 0 <= i < depth), None)
    if bad is not None:
        raise ValueError(f"block {bad} does not exist in a {depth}-block backbone; use 0..{depth - 1}")


def train_keeping_frozen(wrapper: nn.Module, frozen: nn.Module, mode: bool) -> None:
    """``wrapper.train(mode)`` with ``frozen`` (one of its children) held in eval mode.

    Dropout and drop-path of a frozen backbone stay off. Only the flags of the other children change:
    ``nn.Module.train`` would walk every backbone module twice per switch (train, then eval), which
    costs milliseconds that the small presets' basis passes and evaluations would pay each time.
    """
    wrapper.training = mode
    for child in wrapper.children():
        if child is not frozen:
            child.train(mode)
    if frozen.training:
        frozen.eval()
