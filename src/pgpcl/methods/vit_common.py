"""Pieces shared by the ViT-based methods (L2P, DualPrompt, CODA-Prompt)."""

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
