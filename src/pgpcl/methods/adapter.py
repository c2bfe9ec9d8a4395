"""Adapter continual learner on a frozen ViT, and Adapter-PGP with ``pgp.enabled=true``.

One bottleneck adapter beside the MLP of each block in ``blocks`` (AdaptFormer-style: mlp(x) +
scale * relu(x W_down^T) W_up^T on the MLP's input), shared by all tasks and trained on each in turn,
with a linear classifier on the final-norm CLS output; loss: cross-entropy over the current task's
classes. Without PGP this is sequential fine-tuning of the adapters: the baseline.

PGP protects both maps of each adapter the GPM way: W_down's rows are kept orthogonal to the adapter's
old inputs x (kind ``adapter_down``), so relu(x_old W_down^T) does not change, and W_up's rows
orthogonal to those old hidden activations (kind ``adapter_up``). The adapter's output on old inputs
is then unchanged, hence so is everything after it. The adapters have no biases for that reason (a
bias change moves every input's output).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS
from pgpcl.methods.base import Method
from pgpcl.methods.vit_common import BackboneTuningMethod


@dataclass
class AdapterParams:
    """The adapters' settings, shared by the ViT and CLIP adapter learners (their Params derive from it)."""

    hidden: int = 16
    """Bottleneck width h."""
    scale: float = 0.1
    """Weight of the adapter's output (AdaptFormer's s)."""
    blocks: list[int] | None = None
    """Blocks that get an adapter; None = all."""

    def validate(self) -> None:
        from pgpcl.methods.base import check_block_list

        check_block_list(self.blocks, "blocks")
        if self.hidden < 1:
            raise ConfigError(f"method.hidden must be >= 1, got {self.hidden}")
        if self.scale <= 0:
            raise ConfigError(f"method.scale must be > 0, got {self.scale}")


class AdapterPGP:
    """The adapters as a tuned-module method's pieces (ViT and CLIP): how they are added, what PGP
    protects of each and the rows it gets (module docstring)."""

    default_eps = {"adapter_down": 0.97, "adapter_up": 0.97}
    maps = (("down", "adapter_down", "down"), ("up", "adapter_up", "up"))

    def add_modules(self, blocks, indices: list[int], width: int) -> dict[str, nn.Module]:
        from pgpcl.models.adapter import add_adapters

        return add_adapters(blocks, indices, width, self.params.hidden, self.params.scale)

    def captured_rows(self, name: str, module) -> dict[str, Tensor]:
        """down: the adapter's inputs x (B, T, D); up: its hidden activations relu(x W_down^T) (B, T, h)."""
        inputs, hidden = module.captured
        return {f"{name}.down": inputs, f"{name}.up": hidden}


@METHODS.register("adapter")
class Adapter(AdapterPGP, BackboneTuningMethod, Method):
    @dataclass
    class Params(AdapterParams):
        pass
