"""Prefix-tuning continual learner on a frozen ViT, and Prefix-PGP with ``pgp.enabled=true``.

One prefix per layer in ``layers`` (a key-prefix and a value-prefix of ``length`` tokens joined to that
layer's attention keys and values, as DualPrompt's G-prompt), shared by all tasks and trained on each in
turn, with a linear classifier on the final-norm CLS output; loss: cross-entropy over the current task's
classes. No prompt pool and no query pass. Without PGP this is sequential prefix-tuning: the baseline.

PGP, two levels:
- keys (always, kind ``prefix``): each layer's key-prefix is kept orthogonal to that layer's old queries
  W_q LN(x), so the attention logits of old inputs on the prefix do not change: the paper's condition
  for prefix-tuning (Q_old dK^T = 0). ``key_basis=layer`` reads it as the paper and DualPrompt-PGP do,
  one basis per layer over full-width queries in R^D; but attention takes q.k per head, and
  q_old . dk = 0 over all heads together does not make each head's q_h . dk_h zero. ``key_basis=head``
  (default) keeps one basis per head, in R^(D/H), from that head's queries: the logits each head sees
  are kept.
- values (``method.protect_values``, on by default; kind ``prefix_value``): the keys alone leave the value-prefix
  free, so what old inputs read from the prefix still changes. Old token t of head h reads
  a_{t,h} V_h, a_{t,h} in R^Lp its attention weights on the prefix positions; keeping the value-prefix's
  change orthogonal, along the prefix-token axis, to the span of the old weight vectors (all heads
  pooled) leaves that unchanged. With both, the layer's output on old inputs is unchanged, hence so are
  the inputs of the later layers and every later basis stays valid (the LoRA / adapter chain argument;
  pgpcl's derivation, not released code). The value basis lives in R^Lp: it fills quickly, and a full
  one freezes the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS
from pgpcl.methods.base import Method, MethodOutput, check_block_list, check_blocks_exist
from pgpcl.methods.vit_common import KeyPrefixBases, ViTBackboneMethod, init_head, init_prompt_


@METHODS.register("prefix")
class Prefix(ViTBackboneMethod, Method):
    @dataclass
    class Params:
        length: int = 5
        """Prefix tokens per layer (each a key and a value)."""
        layers: list[int] | None = None
        """Blocks that get a prefix; None = all."""
        key_basis: Literal["head", "layer"] = "head"
        """PGP's key bases: one per attention head (exact per-head logits) or one per layer (the paper's
        full-width rule, as DualPrompt-PGP); module docstring."""
        protect_values: bool = True
        """PGP also protects the value-prefixes (module docstring); off = the paper's key-only rule."""
        prompt_init: Literal["uniform", "zero", "normal"] = "uniform"

        def validate(self) -> None:
            if self.length < 1:
                raise ConfigError(f"method.length must be >= 1, got {self.length}")
            check_block_list(self.layers, "layers")

    default_eps = {"prefix": 0.97, "prefix_value": 0.97}
    basis_timing = "task_end"
    ddp_find_unused_parameters = False

    def __init__(self, params: Params, backbone: nn.Module, num_classes: int, task_classes):
        super().__init__(params, num_classes, task_classes)
        self.backbone = backbone
        depth = backbone.depth
        self.layers = list(range(depth)) if params.layers is None else list(params.layers)
        check_blocks_exist(self.layers, depth, "layers")
        self.prefix = nn.Parameter(torch.empty(len(self.layers), 2, params.length, backbone.embed_dim))
        init_prompt_(self.prefix, params.prompt_init)
        self.head = init_head(nn.Linear(backbone.embed_dim, num_classes))

    def _prefix_dict(self) -> dict[int, tuple[Tensor, Tensor]]:
        """{layer: (key (1, L, D), value (1, L, D))}: one prefix for every image."""
        return {layer: (self.prefix[i, 0].unsqueeze(0), self.prefix[i, 1].unsqueeze(0))
                for i, layer in enumerate(self.layers)}

    def forward(self, x: Tensor, task: Tensor | None = None) -> MethodOutput:
        feat = self.backbone.forward_features(x, prefixes=self._prefix_dict(), out_rows=1).tokens[:, 0]
        return MethodOutput(self.head(feat))

    # -- PGP ---------------------------------------------------------------------------------------
    def protected_groups(self, eps: dict[str, float]):
        from pgpcl.projection import ProtectedGroup

        groups = self._keys().groups("prefix", eps["prefix"])
        if self.params.protect_values:
            groups += [ProtectedGroup(f"value.l{layer}", "prefix_value", self.prefix, _value_view(i),
                                      eps["prefix_value"]) for i, layer in enumerate(self.layers)]
        return groups

    @torch.no_grad()
    def representations(self, x: Tensor, task: Tensor) -> dict[str, Tensor]:
        """keys: each prefixed layer's queries (B, T, D); values: the tokens' attention weights on its
        prefix positions, heads pooled (B, H * T, L). One forward up to the last prefixed layer (the
        queries alone need only that layer's query third)."""
        prefixes = self._prefix_dict()
        if self.params.protect_values:
            queries, weights = self.backbone.queries_and_prefix_weights(x, prefixes)
        else:
            queries, weights = self.backbone.queries(x, self.layers, prefixes=prefixes), {}
        out = self._keys().rows(queries)
        out.update({f"value.l{layer}": w.flatten(1, 2) for layer, w in weights.items()})
        return out

    def _keys(self) -> KeyPrefixBases:
        entries = [(f"key.l{layer}", self.prefix, _key_view(i), layer) for i, layer in enumerate(self.layers)]
        bb = self.backbone
        return KeyPrefixBases(entries, self.params.key_basis == "head", bb.num_heads, bb.embed_dim)


def _key_view(i: int):
    """Layer i's key-prefix: (L, D) out of (n_layers, 2, L, D)."""
    return lambda t: t[i, 0]


def _value_view(i: int):
    """Layer i's value-prefix with the prefix-token axis last: (D, L) out of (n_layers, 2, L, D), so
    that projecting its rows acts along L."""
    return lambda t: t[i, 1].transpose(0, 1)
