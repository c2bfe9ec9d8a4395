"""Pieces shared by the ViT-based methods (L2P, DualPrompt, CODA-Prompt, LoRA, adapters)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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


class BackboneTuningMethod(ViTBackboneMethod):
    """Methods that train small modules inside the frozen ViT (LoRA, adapters), with a linear head on the
    final-norm CLS output. A subclass calls :meth:`attach` with the function that adds its modules, names
    in ``maps`` the weights PGP protects, and says in :meth:`captured_rows` which rows each one gets.
    """

    tuned: dict[str, nn.Module]
    """{name: added module with ``capture`` / ``captured``}, e.g. {"b0.qkv": LoRALinear}."""
    maps: tuple[tuple[str, str, str], ...] = ()
    """(group suffix, eps kind, attribute) per protected weight of a module, e.g. ("A", "lora_a", "lora_a")."""

    def attach(self, backbone: nn.Module, num_classes: int, add) -> None:
        """``add(vit, blocks)`` puts the modules into ``method.blocks`` (None = all) of the ViT."""
        from pgpcl.errors import ConfigError

        self.backbone = backbone
        blocks = list(range(backbone.depth)) if self.params.blocks is None else list(self.params.blocks)
        try:
            self.tuned = add(backbone.vit, blocks)
        except ValueError as e:
            raise ConfigError(f"method: {e}") from None
        # PromptedViT froze the ViT before these modules existed: they alone of it are trainable.
        self.head = init_head(nn.Linear(backbone.embed_dim, num_classes))

    def protected_groups(self, eps: dict[str, float]):
        from pgpcl.projection import ProtectedGroup

        return [ProtectedGroup(f"{name}.{suffix}", kind, getattr(m, attr), None, eps[kind])
                for name, m in self.tuned.items() for suffix, kind, attr in self.maps]

    def forward(self, x: Tensor, task: Tensor | None = None):
        from pgpcl.methods.base import MethodOutput

        # The whole sequence through every block: PromptedViT's row-only shortcuts (out_rows, query)
        # read attn.qkv.weight directly and would bypass a LoRA on qkv.
        return MethodOutput(self.head(self.backbone.forward_features(x).tokens[:, 0]))

    def captured_rows(self, name: str, module: nn.Module) -> dict[str, Tensor]:
        """PGP group name -> rows (B, T, D_group) from what ``module`` captured in the last forward."""
        raise NotImplementedError

    @torch.no_grad()
    def representations(self, x: Tensor, task: Tensor) -> dict[str, Tensor]:
        """Every tuned module's rows, from one full forward with capturing on."""
        for m in self.tuned.values():
            m.capture = True
        try:
            self.backbone.forward_features(x)
            out: dict[str, Tensor] = {}
            for name, m in self.tuned.items():
                out.update(self.captured_rows(name, m))
        finally:
            for m in self.tuned.values():
                m.capture, m.captured = False, None
        return out


def pool_key_prefix_view(i: int):
    """PGP view of the key-prefixes of every prompt of a prefix pool at prefixed layer i: (M, L, D) out of
    (M, n_layers, 2, L, D) (DualPrompt's E-prompts, CODA-Prompt's components)."""
    return lambda t: t[:, i, 0]


def init_head(head: nn.Linear) -> nn.Linear:
    """Small initial weights so untrained classes do not dominate logits."""
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def init_prompt_(t, kind: str) -> None:
    """Initialise a prompt tensor in place: 'uniform' in [-1, 1] (as released), 'normal' or 'zero'."""
    if kind == "uniform":
        nn.init.uniform_(t, -1.0, 1.0)
    elif kind == "normal":
        nn.init.normal_(t, std=0.02)
    else:
        nn.init.zeros_(t)
