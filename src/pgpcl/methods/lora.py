"""LoRA continual learner on a frozen ViT, and LoRA-PGP with ``pgp.enabled=true``.

One set of LoRA factors (rank r at ``targets`` of ``blocks``) shared by all tasks and trained on each
in turn, with a linear classifier on the final-norm CLS output; loss: cross-entropy over the current
task's classes. Without PGP this is sequential fine-tuning of the LoRA factors: the baseline.

PGP treats each wrapped layer y = W x + s B A x as the chain of two linear maps it is and protects
both, GPM-style: A's rows are kept orthogonal to the layer's old inputs x (kind ``lora_a``), so
A x_old does not change, and B's rows orthogonal to those old A x (kind ``lora_b``), so B A x_old does
not change either. Then the layer's output on old inputs is unchanged, hence so are the inputs of the
layers after it, and every later basis stays valid. (The follow-up work of PGP's authors, PEGP, applies
gradient projection to LoRA; this is pgpcl's derivation of it, not their code.) B has only r input
directions: once its basis holds all r, B is frozen and the layer learns through A alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS
from pgpcl.methods.base import Method
from pgpcl.methods.vit_common import BackboneTuningMethod


@dataclass
class LoRAParams:
    """LoRA's settings, shared by the ViT and CLIP LoRA learners (their Params derive from it)."""

    rank: int = 4
    alpha: float | None = None
    """Scale of the update is alpha / rank; None = rank (scale 1)."""
    blocks: list[int] | None = None
    """Blocks that get LoRA; None = all."""
    targets: list[str] = field(default_factory=lambda: ["qkv"])
    """Layers of each block, on the ViT and on CLIP: any of qkv, proj (attention), fc1, fc2 (MLP)."""

    def validate(self) -> None:
        from pgpcl.models.lora import TARGETS

        self.check_all(TARGETS)

    def check_all(self, allowed) -> None:
        """rank, alpha, blocks, and targets among ``allowed`` (the ViT's or CLIP's LoRA targets)."""
        from pgpcl.methods.base import check_block_list

        if self.rank < 1:
            raise ConfigError(f"method.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"method.alpha must be > 0 (the update's scale is alpha / rank), got {self.alpha}")
        check_block_list(self.blocks, "blocks")
        bad = [t for t in self.targets if t not in allowed]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"method.targets must be distinct names from {', '.join(allowed)}, got {self.targets}")

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


class LoRAPGP:
    """What PGP protects of each LoRA module and the rows it gets (module docstring)."""

    default_eps = {"lora_a": 0.97, "lora_b": 0.97}
    maps = (("A", "lora_a", "lora_a"), ("B", "lora_b", "lora_b"))

    def captured_rows(self, name: str, module) -> dict[str, Tensor]:
        """A: the layer's inputs x (B, T, in); B: x A^T (B, T, r)."""
        inputs = module.captured
        return {f"{name}.A": inputs, f"{name}.B": inputs @ module.lora_a.T}


@METHODS.register("lora")
class LoRA(LoRAPGP, BackboneTuningMethod, Method):
    @dataclass
    class Params(LoRAParams):
        pass

    def add_modules(self, blocks, indices: list[int], width: int) -> dict[str, nn.Module]:
        from pgpcl.models.lora import add_lora

        p = self.params
        return add_lora(blocks, indices, p.targets, p.rank, p.scale_alpha)
