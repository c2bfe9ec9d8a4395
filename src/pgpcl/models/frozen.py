"""Mode switching for wrappers around a frozen backbone."""

from __future__ import annotations

from torch import nn


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
