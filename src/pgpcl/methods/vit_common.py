"""Pieces shared by the ViT-based methods (L2P, DualPrompt, CODA-Prompt, LoRA, adapters)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from pgpcl.models.prompts import init_prompt_ as init_prompt_  # re-exported: methods take their pieces here


def build_backbone(backbone_cfg):
    """A frozen :class:`PromptedViT` and the identity of its weights."""
    from pgpcl.models import PromptedViT, build_vit

    vit, info = build_vit(backbone_cfg)
    backbone = PromptedViT(vit, fused_attention=backbone_cfg.fused_attention)
    if backbone_cfg.compile:
        backbone.compile_blocks(backbone_cfg.compile_backend)
    return backbone, info


class QueryPromptedPredict:
    """Evaluation for methods that pick prompts with the frozen ViT's query (L2P, DualPrompt): the query
    is the part of ``predict`` the engine may cache across evaluations. Mixed into a ``Method`` whose
    ``forward(x, task, query=None)`` takes a precomputed query."""

    @torch.no_grad()
    def predict(self, x: Tensor, query: Tensor | None = None) -> Tensor:
        return self.forward(x, None, query=query).logits

    @torch.no_grad()
    def frozen_query(self, x: Tensor) -> Tensor:
        return self.backbone.query(x)


class ViTBackboneMethod:
    """Mixin for methods on the frozen :class:`PromptedViT` constructed as ``cls(params, backbone,
    num_classes, task_classes)``: builds one from a config."""

    @classmethod
    def build(cls, cfg, scenario):
        backbone, info = build_backbone(cfg.backbone)
        method = cls(cfg.method.params, backbone, scenario.num_classes, scenario.task_classes)
        method.weights_info = info
        return method


class PromptedViTMethod(ViTBackboneMethod, QueryPromptedPredict):
    """Methods that pick or assemble prompts from the frozen ViT's query (L2P, DualPrompt, CODA-Prompt):
    built from a config, and predicting with the cacheable query."""

    _batch_ids: Tensor | None = None
    """(1, k): the pool's batch-wise vote over a whole training batch, while its pieces train."""

    @contextlib.contextmanager
    def _vote_on_whole_batch(self, x: Tensor, top_k: int):
        """Take the pool's batch-wise vote once, over the whole batch x (B, C, H, W), and hold it in
        ``_batch_ids`` for the pieces' forward passes (``Method.whole_batch``)."""
        with torch.no_grad():
            self._batch_ids = self.pool.select(self.backbone.query(x), top_k, batchwise=True).idx[:1]
        try:
            yield
        finally:
            self._batch_ids = None


class TunedModulesPGP:
    """PGP for small modules trained inside a frozen backbone (LoRA factors, adapters): ``tuned`` holds the
    added modules, each with ``capture`` / ``captured``; ``maps`` names the weights PGP protects, and
    :meth:`captured_rows` says which rows each one gets; :meth:`capture_forward` is the backbone forward
    that makes the modules capture."""

    tuned: dict[str, nn.Module]
    """{name: added module with ``capture`` / ``captured``}, e.g. {"b0.qkv": LoRALinear}."""
    maps: tuple[tuple[str, str, str], ...] = ()
    """(group suffix, eps kind, attribute) per protected weight of a module, e.g. ("A", "lora_a", "lora_a")."""

    def protected_groups(self, eps: dict[str, float]):
        from pgpcl.projection import ProtectedGroup

        return [ProtectedGroup(f"{name}.{suffix}", kind, getattr(m, attr), None, eps[kind])
                for name, m in self.tuned.items() for suffix, kind, attr in self.maps]

    def add_modules(self, blocks, indices: list[int], width: int) -> dict[str, nn.Module]:
        """Put the method's modules into ``blocks[i]`` for i in ``indices`` (tokens ``width`` wide); returns
        {name: module}. A ValueError (e.g. a block that does not exist) becomes a ConfigError."""
        raise NotImplementedError

    def attach_tuned(self, blocks, width: int, chosen: list[int] | None, key: str = "blocks") -> None:
        """``add_modules`` on ``chosen`` (``method.<key>``) of ``blocks`` (None = all) into ``tuned``."""
        from pgpcl.errors import ConfigError

        indices = list(range(len(blocks))) if chosen is None else list(chosen)
        try:
            self.tuned = self.add_modules(blocks, indices, width)
        except ValueError as e:  # about a block ("block 9 does not exist ...") names the key that chose it
            raise ConfigError(f"method.{key}: {e}" if str(e).startswith("block ") else f"method: {e}") from None

    def captured_rows(self, name: str, module: nn.Module) -> dict[str, Tensor]:
        """PGP group name -> rows (B, T, D_group) from what ``module`` captured in the last forward."""
        raise NotImplementedError

    def capture_forward(self, x: Tensor) -> None:
        """A forward of the backbone through every tuned module (the output is not used)."""
        raise NotImplementedError

    @torch.no_grad()
    def representations(self, x: Tensor, task: Tensor) -> dict[str, Tensor]:
        """Every tuned module's rows, from one full forward with capturing on."""
        for m in self.tuned.values():
            m.capture = True
        try:
            self.capture_forward(x)
            out: dict[str, Tensor] = {}
            for name, m in self.tuned.items():
                out.update(self.captured_rows(name, m))
        finally:
            for m in self.tuned.values():
                m.capture, m.captured = False, None
        return out


class BackboneTuningMethod(TunedModulesPGP, ViTBackboneMethod):
    """Methods that train small modules inside the frozen ViT (LoRA, adapters), with a linear head on the
    final-norm CLS output. A subclass implements :meth:`add_modules`, names in ``maps`` the weights PGP
    protects, and says in :meth:`captured_rows` which rows each one gets.
    """

    basis_timing = "task_end"
    ddp_find_unused_parameters = False  # every added module takes part in every step

    def __init__(self, params, backbone: nn.Module, num_classes: int, task_classes):
        super().__init__(params, num_classes, task_classes)
        self.backbone = backbone
        self.attach_tuned(backbone.vit.blocks, backbone.embed_dim, params.blocks)
        # PromptedViT froze the ViT before these modules existed: they alone of it are trainable.
        self.head = init_head(nn.Linear(backbone.embed_dim, num_classes))

    def forward(self, x: Tensor, task: Tensor | None = None):
        from pgpcl.methods.base import MethodOutput

        # The whole sequence through every block: PromptedViT's row-only shortcuts (out_rows, query)
        # read attn.qkv.weight directly and would bypass a LoRA on qkv.
        return MethodOutput(self.head(self.backbone.forward_features(x).tokens[:, 0]))

    def capture_forward(self, x: Tensor) -> None:
        self.backbone.forward_features(x)


class KeyPrefixBases:
    """PGP's key-prefix groups of a prefix-tuning method, and the rows each one gets.

    ``entries``: (group name, parameter, view of a key-prefix (..., L, D) in it, layer). With one basis per
    layer (``per_head=False``, the paper's rule and DualPrompt-PGP's) a key-prefix's rows are kept
    orthogonal to the layer's full-width queries, which makes the old inputs' logits on the prefix
    unchanged only summed over the heads; with ``per_head`` every head's columns get their own basis from
    that head's queries, so each head's logits are kept (docs/pgp.md, section 14).
    """

    def __init__(self, entries, per_head: bool, num_heads: int, embed_dim: int):
        self.per_head = per_head
        width = embed_dim // num_heads if per_head else embed_dim
        cuts = [(f".h{h}", slice(h * width, (h + 1) * width)) for h in range(num_heads)] if per_head else [("", slice(None))]
        self.parts = [(name + suffix, param, _columns(view, cols), layer, cols, name, view)
                      for name, param, view, layer in entries for suffix, cols in cuts]

    def groups(self, kind: str, eps: float, components: int | None = None):
        """``components``: the released arithmetic's PCA width; per-head bases have no released arithmetic,
        so they get none and ``pgp.mode=reference`` is refused for them."""
        from pgpcl.projection import Block, ProtectedGroup

        components = None if self.per_head else components
        return [ProtectedGroup(name, kind, param, view, eps, components=components,
                               block=Block(key, base, cols) if self.per_head else None)
                for name, param, view, _, cols, key, base in self.parts]

    def rows(self, queries: dict[int, Tensor]) -> dict[str, Tensor]:
        """{layer: queries W_q LN(x) (B, T, D)} -> {group: (B, T, D or D / H)}, for the layers given."""
        return {name: queries[layer][..., cols] for name, _, _, layer, cols, *_ in self.parts if layer in queries}


def _columns(view, cols: slice):
    return lambda t: view(t)[..., cols]


def pool_key_prefix_view(i: int):
    """PGP view of the key-prefixes of every prompt of a prefix pool at prefixed layer i: (M, L, D) out of
    (M, n_layers, 2, L, D) (DualPrompt's E-prompts, CODA-Prompt's components)."""
    return lambda t: t[:, i, 0]


def init_head(head: nn.Linear) -> nn.Linear:
    """Small initial weights so untrained classes do not dominate logits."""
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


