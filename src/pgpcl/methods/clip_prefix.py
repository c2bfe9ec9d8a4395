"""CLIP prefix-tuning learner, and CLIP-Prefix-PGP with ``pgp.enabled=true``.

The CLIP prompt learner's text side (one CoOp context per task; :mod:`pgpcl.methods.clip_prompt`) with a
key/value prefix of ``length`` tokens on the attention of each of ``layers`` of the image tower instead
of an image prompt (``models/clip_prefix.py``), shared by all tasks and trained on each in turn. Without
PGP this is sequential prefix-tuning of the image tower: the baseline.

PGP as for the ViT prefix learner (``methods/prefix.py``, docs/pgp.md section 14): each layer's
key-prefix orthogonal to that layer's old queries, one basis per head by default (``key_basis``), and,
with ``protect_values`` (default), the value-prefix orthogonal along the prefix-token axis to the old
tokens' attention weights on the prefix, so each prefixed layer's output on old images is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS
from pgpcl.methods.base import check_block_list
from pgpcl.methods.clip_prompt import CLIPTextLearner, TextParams, TunedImageTower
from pgpcl.methods.vit_common import KeyPrefixBases, init_prompt_


@METHODS.register("clip_prefix")
class CLIPPrefix(TunedImageTower, CLIPTextLearner):
    @dataclass
    class Params(TextParams):
        length: int = 5
        """Prefix tokens per layer (each a key and a value)."""
        layers: list[int] | None = None
        """Image-tower blocks that get a prefix; None = all."""
        key_basis: Literal["head", "layer"] = "head"
        protect_values: bool = True
        prompt_init: Literal["normal", "zero", "uniform"] = "normal"
        """normal: std 0.02, so the tower starts close to the pretrained one; uniform: U(-1, 1)."""

        def validate(self) -> None:
            if self.length < 1:
                raise ConfigError(f"method.length must be >= 1, got {self.length}")
            check_block_list(self.layers, "layers")
            TextParams.validate(self)

    default_eps = {"prefix": 0.97, "prefix_value": 0.97}

    def init_image_side(self, backbone: nn.Module) -> None:
        tower = backbone.clip.visual.transformer
        self.attach_tuned(tower.resblocks, backbone.embed_dim, self.params.layers, "layers")
        entries = [(f"key.{name}", m.prefix, _key_view, int(name[1:])) for name, m in self.tuned.items()]
        heads = next(iter(self.tuned.values())).attn.num_heads
        self.key_bases = KeyPrefixBases(entries, self.params.key_basis == "head", heads, backbone.embed_dim)

    def add_modules(self, blocks, indices: list[int], width: int) -> dict[str, nn.Module]:
        from pgpcl.models.clip_prefix import add_clip_prefixes

        added = add_clip_prefixes(blocks, indices, self.params.length)
        for m in added.values():
            init_prompt_(m.prefix.data, self.params.prompt_init)
        return added

    # -- PGP -----------------------------------------------------------------------------------------
    def protected_groups(self, eps: dict[str, float]):
        from pgpcl.projection import ProtectedGroup

        groups = self.key_bases.groups("prefix", eps["prefix"])
        if self.params.protect_values:
            groups += [ProtectedGroup(f"value.{name}", "prefix_value", m.prefix, _value_view, eps["prefix_value"])
                       for name, m in self.tuned.items()]
        return groups

    def captured_rows(self, name: str, module: nn.Module) -> dict[str, Tensor]:
        """keys: the layer's queries (B, T, D), cut per head; values: the tokens' attention weights on its
        prefix positions, heads pooled (B, H * T, L)."""
        queries, weights = module.captured
        out = self.key_bases.rows({int(name[1:]): queries})
        if self.params.protect_values:
            out[f"value.{name}"] = weights.flatten(1, 2)
        return out


def _key_view(t: Tensor) -> Tensor:
    """The key-prefix (L, D) of one layer's prefix (2, L, D)."""
    return t[0]


def _value_view(t: Tensor) -> Tensor:
    """The value-prefix with the prefix-token axis last: (D, L), so that projecting rows acts along L."""
    return t[1].transpose(0, 1)
