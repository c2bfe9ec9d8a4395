"""The frozen timm ViT backbone and the prompted forward pass that drives its modules.

Weights used for the published PGP / L2P / DualPrompt numbers: ViT-B/16 pretrained on ImageNet-21k,
the original Google ``ViT-B_16.npz`` that the released code downloads, which is timm's
``vit_base_patch16_224.orig_in21k`` (``backbone.weights=hub backbone.pretrained_tag=orig_in21k``, the
presets' default) and loads from the ``.npz`` directly; ``augreg_in21k`` is a later 21k pretraining.
Note that timm's *default* tag for ``vit_base_patch16_224`` is ``augreg2_in21k_ft_in1k`` (fine-tuned
on ImageNet-1k), which is not what the papers used: set the tag.

:class:`PromptedViT` never forks timm's ``vision_transformer.py``: it calls the timm modules
(``patch_embed``, ``_pos_embed``, each block's ``norm1``, ``attn.qkv``, ``q_norm``/``k_norm``,
``attn.proj``, ``ls1``/``ls2``, ``drop_path1``/``drop_path2``, ``norm2``, ``mlp``, the final ``norm``)
and only re-implements the attention product where prefixes join the keys and values (and, for the
query pass, the last block for the CLS row alone).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgpcl.config import BackboneConfig
from pgpcl.errors import ConfigError, describe
from pgpcl.models.attention import attention_weights, plain_product, plain_product_preferred
from pgpcl.models.frozen import train_keeping_frozen
from pgpcl.models.weights import (
    WeightsInfo,
    fetch_hub_weights,
    load_weights_file,
    resolve_builtin,
)

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

_OVERRIDES = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")


# ----------------------------------------------------------------------------------------------------
# Building the backbone


def _skip_init() -> dict[str, Any]:
    """``weight_init='skip'`` where this timm supports it: random init of a ViT-B costs seconds, and
    weights that will be loaded overwrite every checked tensor anyway."""
    import inspect

    from timm.models.vision_transformer import VisionTransformer

    param = inspect.signature(VisionTransformer.__init__).parameters.get("weight_init")
    return {"weight_init": "skip"} if param is not None and "'skip'" in str(param.annotation) else {}


def _create(arch: str, kwargs: dict[str, Any], init: bool = True) -> VisionTransformer:
    """timm.create_model without weights; unknown arch, bad sizes or non-ViT -> ConfigError.

    ``init=False`` leaves parameters uninitialised: only for a model whose weights are loaded next.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models("vit*"), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; see timm.list_models('vit*')"
        raise ConfigError(f"unknown backbone.arch '{arch}'{hint}")
    try:
        extra = {} if init or "weight_init" in kwargs else _skip_init()
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs, **extra)
    except Exception as e:  # timm asserts on inconsistent sizes (e.g. embed_dim % num_heads)
        if extra:  # a non-ViT arch may refuse weight_init: retry plainly for the accurate error
            return _create(arch, kwargs)
        raise ConfigError(
            f"backbone '{arch}' cannot be built with {kwargs} ({describe(e, 120, with_type=True)}); "
            "fix backbone.embed_dim/num_heads/img_size/patch_size"
        ) from e
    if extra and set(dict(model.named_buffers())) - set(model.state_dict()):
        return _create(arch, kwargs)  # non-persistent buffers would not be loaded: initialise after all
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"backbone.arch '{arch}' builds a {type(model).__name__}, not a timm VisionTransformer; pick a vit_* arch"
        )
    return model


def _overrides(cfg: BackboneConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in _OVERRIDES if getattr(cfg, k) is not None}


def _arch_and_tag(cfg: BackboneConfig) -> tuple[str, str | None]:
    """Split 'vit_base_patch16_224.augreg_in21k' into arch and tag; backbone.pretrained_tag wins."""
    arch, _, arch_tag = cfg.arch.partition(".")
    return arch, cfg.pretrained_tag or arch_tag or None


def build_vit(cfg: BackboneConfig) -> tuple[VisionTransformer, WeightsInfo]:
    """Build the timm VisionTransformer described by ``cfg`` (no head) and load its weights.

    ``cfg.weights``: None = random init; ``'hub'`` = timm pretrained ``arch.pretrained_tag`` (downloaded
    once, then cached); a ``.npz`` / ``.safetensors`` / ``.pth`` path; ``'builtin:NAME'`` = a file
    shipped in ``pgpcl/assets`` whose sidecar JSON names the arch (it replaces ``cfg.arch``).
    Returns (model in eval mode, WeightsInfo). Raises ConfigError / CheckpointError.
    """
    weights = cfg.weights
    arch, tag = _arch_and_tag(cfg)
    kwargs = _overrides(cfg)
    if weights is not None and weights.startswith("builtin:"):
        arch, base_kwargs, path = resolve_builtin(weights.split(":", 1)[1])
        model = _create(arch, {**base_kwargs, **kwargs}, init=False)  # the sidecar's arch replaces cfg.arch
        info = WeightsInfo(weights, load_weights_file(model, path, f"'{weights}'"))
    elif weights == "hub":
        model = _create(arch, kwargs, init=False)  # first: config mistakes surface before any download
        name, path = fetch_hub_weights(arch, tag)
        info = WeightsInfo(f"hub:{name}", load_weights_file(model, path, f"'{name}' ({path})"))
    elif weights is None:
        model, info = _create(arch, kwargs), WeightsInfo("random", None)
    else:
        model, path = _create(arch, kwargs, init=False), os.path.expanduser(weights)
        info = WeightsInfo(f"file:{path}", load_weights_file(model, path))
    return model.eval(), info


# ----------------------------------------------------------------------------------------------------
# Prompted forward


@dataclass
class FeatureOutput:
    """``tokens``: (B, T, D) after the final norm, T = prefix tokens + P prompts + N patches.
    ``queries``: {layer: (B, T, D)} = W_q LN(x) of that layer (heads concatenated, after q_norm)."""

    tokens: Tensor
    queries: dict[int, Tensor] = field(default_factory=dict)

    @property
    def cls(self) -> Tensor:
        """(B, D) output at the CLS position."""
        return self.tokens[:, 0]


class PromptedViT(nn.Module):
    """A frozen timm ViT with prompt-tuning (tokens after CLS) and prefix-tuning (extra K/V) inputs.

    All ViT parameters get ``requires_grad=False`` and the ViT stays in eval mode whatever
    ``.train()`` says, so dropout / drop-path never act on the frozen backbone. The query encoder of
    L2P / DualPrompt is this same module run without prompts (:meth:`query`): no second copy.

    Register tokens are kept after CLS, so the sequence is [CLS, regs, prompts, patches];
    ``num_prefix_tokens`` (1 + regs) tells where prompts start.
    """

    def __init__(self, vit: nn.Module, fused_attention: bool = True):
        super().__init__()
        _check_supported(vit)
        self.vit = vit
        self.fused_attention = fused_attention
        self._use_kernel(fused_attention)
        vit.requires_grad_(False)
        vit.eval()

    def train(self, mode: bool = True) -> PromptedViT:
        train_keeping_frozen(self, self.vit, mode)
        return self

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile each block's forward in place (``nn.Module.compile``): weights, state-dict keys
        and the prefix path (which drives the block's sub-modules itself) are unchanged."""
        for blk in self.vit.blocks:
            blk.compile(backend=backend)

    # -- attention kernel ------------------------------------------------------------------------------

    def _fused_for(self, h: Tensor) -> bool:
        """Whether attention on ``h`` uses F.scaled_dot_product_attention: ``fused_attention``, except
        where the plain product is faster (bf16 / fp16 on the CPU: :func:`plain_product_preferred`)."""
        return self.fused_attention and not plain_product_preferred(h)

    def _use_kernel(self, fused: bool) -> None:
        """Set timm's kernel flag ``attn.fused_attn``, which the blocks left to timm read at each call."""
        for blk in self.vit.blocks:
            if blk.attn.fused_attn != fused:
                blk.attn.fused_attn = fused

    # -- sizes ---------------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.vit.blocks[0].attn.num_heads)

    @property
    def num_patches(self) -> int:
        return int(self.vit.patch_embed.num_patches)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens that precede prompts and patches."""
        return int(self.vit.num_prefix_tokens)

    # -- embeddings ----------------------------------------------------------------------------------

    def patch_tokens(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D) patch-embedding output, before CLS and positions."""
        return _flat_patches(self.vit.patch_embed(x))

    def embed(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1+N, D): CLS + patches with positions (then pos_drop, norm_pre)."""
        return self._sequence(x, None)

    def _sequence(self, x: Tensor, prompts: Tensor | None, patches: Tensor | None = None) -> Tensor:
        """Embedded input with prompts (B, P, D) inserted after the prefix tokens -> (B, R+P+N, D).

        ``patches``: ``patch_embed(x)`` when the caller already has it.
        """
        vit = self.vit
        h = vit.patch_drop(vit._pos_embed(vit.patch_embed(x) if patches is None else patches))
        if prompts is not None:
            prompts = _batched(prompts, h.shape[0], "prompts")
            if prompts.shape[-1] != h.shape[-1]:
                raise ValueError(f"prompts must be (B, P, {h.shape[-1]}), got {tuple(prompts.shape)}")
            r = self.num_prefix_tokens
            h = torch.cat([h[:, :r], self._prompt_positions(prompts), h[:, r:]], dim=1)
        return vit.norm_pre(h)

    def _prompt_positions(self, prompts: Tensor) -> Tensor:
        """Give each prompt token the CLS token's position embedding (the released L2P table)."""
        vit = self.vit
        if vit.pos_embed is not None and not vit.no_embed_class:
            prompts = prompts + vit.pos_embed[:, :1].to(prompts.dtype)
        # no_embed_class: CLS carries no position, so neither do the prompts.
        return vit.pos_drop(prompts)

    # -- forward -------------------------------------------------------------------------------------

    def forward_features(
        self,
        x: Tensor,
        prompts: Tensor | None = None,
        prefixes: Mapping[int, tuple[Tensor, Tensor]] | None = None,
        capture_queries: Iterable[int] = (),
        out_rows: int | None = None,
    ) -> FeatureOutput:
        """Prompted forward.

        x: (B, C, H, W). prompts: (B, P, D) (or (1, P, D), shared) inserted after CLS.
        prefixes: {layer: (key_prefix (B, Lp, D), value_prefix (B, Lp, D))} joined in front of that
        layer's keys and values. capture_queries: layers whose W_q LN(x) (B, T, D) is returned.
        out_rows: return only the first ``out_rows`` tokens, (B, out_rows, D); the last block then
        computes queries, attention output and MLP for those rows alone (a classifier that reads CLS
        or the prompt positions needs no patch outputs), which saves most of that block.
        """
        prefixes = dict(prefixes or {})
        capture = set(capture_queries)
        self._check_layers(set(prefixes) | capture)
        h = self._sequence(x, prompts)
        if out_rows is not None and not 1 <= out_rows <= h.shape[1]:
            raise ValueError(f"out_rows must be in 1..{h.shape[1]}, got {out_rows}")
        last = self.depth - 1
        rows_only = out_rows is not None and last not in prefixes and last not in capture
        h, queries = self._run_blocks(h, last if rows_only else self.depth, prefixes, capture)
        if rows_only:
            h = self._block_rows(self.vit.blocks[last], h, out_rows)
        elif out_rows is not None:
            h = h[:, :out_rows]
        return FeatureOutput(self.vit.norm(h), queries)

    def forward(self, x: Tensor, **kwargs: Any) -> FeatureOutput:
        return self.forward_features(x, **kwargs)

    def queries(
        self,
        x: Tensor,
        layers: Iterable[int],
        prompts: Tensor | None = None,
        prefixes: Mapping[int, tuple[Tensor, Tensor]] | None = None,
    ) -> dict[int, Tensor]:
        """Only the captured queries of :meth:`forward_features`: {layer: W_q LN(x) (B, T, D)}.

        Same values as ``forward_features(x, prompts, prefixes, capture_queries=layers).queries``, but
        runs the blocks only up to the last requested layer, and in that one only ``norm1`` and the
        query third of ``qkv``: no later block, no final norm. (DualPrompt's PGP memory pass needs
        layers 0-4 of a 12-block ViT.)
        """
        wanted = set(layers)
        prefixes = dict(prefixes or {})
        self._check_layers(set(prefixes) | wanted)
        if not wanted:
            return {}
        last = max(wanted)
        h, out = self._run_blocks(self._sequence(x, prompts), last, prefixes, wanted)
        blk = self.vit.blocks[last]
        out[last] = self._query_only(blk.attn, blk.norm1(h))
        return out

    def queries_and_prefix_weights(
        self, x: Tensor, prefixes: Mapping[int, tuple[Tensor, Tensor]]
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """For every prefixed layer: the queries W_q LN(x) (B, T, A) and the attention weights of the T
        tokens on that layer's Lp prefix positions (B, H, T, Lp), from one prefixed forward run up to the
        last prefixed layer, of which only the attention runs. (A prefix-tuning learner's PGP pass: keys
        and values.)"""
        prefixes = dict(prefixes)
        self._check_layers(prefixes)
        if not prefixes:
            return {}, {}
        weights: dict[int, Tensor] = {}
        last = max(prefixes)
        h, queries = self._run_blocks(self._sequence(x, None), last, prefixes, set(prefixes), weights)
        blk = self.vit.blocks[last]
        _, queries[last], weights[last] = self._attention(blk.attn, blk.norm1(h), prefixes[last], True)
        return queries, weights

    def _check_layers(self, layers: Iterable[int]) -> None:
        for layer in layers:
            if not 0 <= layer < self.depth:
                raise ValueError(f"layer {layer} out of range for a {self.depth}-block ViT")

    def _run_blocks(
        self, h: Tensor, stop: int, prefixes: Mapping[int, tuple[Tensor, Tensor]], capture: set[int],
        weights: dict[int, Tensor] | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Blocks 0..stop-1 on h (B, T, D): prefixed / captured ones through :meth:`_block`, the rest as
        timm runs them. Returns (h, {layer: queries (B, T, D)} for the captured layers before ``stop``).

        ``weights``: filled with {layer: attention weights of the T tokens on that layer's prefix
        positions (B, H, T, Lp)} for every captured prefixed layer, when given.
        """
        queries: dict[int, Tensor] = {}
        self._use_kernel(self._fused_for(h))
        for i, blk in enumerate(self.vit.blocks[:stop]):
            if i in prefixes or i in capture:
                want = weights is not None and i in capture and i in prefixes
                h, q, w = self._block(blk, h, prefixes.get(i), i in capture, want)
                if q is not None:
                    queries[i] = q
                if w is not None:
                    weights[i] = w
            else:
                h = blk(h)
        return h, queries

    def _block_rows(self, blk: nn.Module, x: Tensor, rows: int) -> Tensor:
        """timm Block output for the first ``rows`` tokens only: (B, T, D) -> (B, rows, D).

        Queries, attention output, MLP and residuals for those rows; keys and values from all T.
        """
        attn = blk.attn
        B, T, _ = x.shape
        H, hd = attn.num_heads, attn.head_dim
        A = H * hd
        h = blk.norm1(x)
        w, b = attn.qkv.weight, attn.qkv.bias
        q = F.linear(h[:, :rows], w[:A], None if b is None else b[:A])
        kv = F.linear(h, w[A:], None if b is None else b[A:])
        q = q.reshape(B, rows, H, hd).transpose(1, 2)
        k, v = kv.reshape(B, T, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = self._product(attn, q, k, v).transpose(1, 2).reshape(B, rows, A)
        if getattr(attn, "norm", None) is not None:
            out = attn.norm(out)
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(h[:, :rows]).sigmoid()
        out = attn.proj_drop(attn.proj(out))
        y = x[:, :rows] + blk.drop_path1(blk.ls1(out))
        return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))

    @staticmethod
    def _query_only(attn: nn.Module, x: Tensor) -> Tensor:
        """W_q x (after q_norm) of normed input (B, T, D) -> (B, T, A), without computing K and V."""
        B, T, _ = x.shape
        H, hd = attn.num_heads, attn.head_dim
        A = H * hd
        bias = attn.qkv.bias[:A] if attn.qkv.bias is not None else None
        q = F.linear(x, attn.qkv.weight[:A], bias).reshape(B, T, H, hd)
        return attn.q_norm(q).reshape(B, T, A)  # q_norm acts on head_dim, the last axis either way

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D): final-norm CLS of the un-prompted image (the L2P/DualPrompt query).

        Equals timm's ``forward_features(x)[:, 0]``; the last block is run for the CLS row only (its
        keys and values still come from every token), which skips most of that block's work.
        """
        return self._query(x, None)

    def patch_tokens_and_query(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(patch_tokens(x), query(x))`` from one patch embedding: (B, N, D), (B, D)."""
        raw = self.vit.patch_embed(x)
        return _flat_patches(raw), self._query(x, raw)

    def _query(self, x: Tensor, patches: Tensor | None) -> Tensor:
        blocks = self.vit.blocks
        h = self._sequence(x, None, patches)
        self._use_kernel(self._fused_for(h))
        for blk in blocks[:-1]:
            h = blk(h)
        return self.vit.norm(self._block_rows(blocks[-1], h, 1))[:, 0]

    # -- prefix-tuning block ---------------------------------------------------------------------------

    def _block(
        self, blk: nn.Module, x: Tensor, prefix: tuple[Tensor, Tensor] | None, capture: bool,
        prefix_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """timm Block forward with optional K/V prefix; (B, T, D) -> ((B, T, D), queries or None,
        attention weights on the prefix positions (B, H, T, Lp) if ``prefix_weights`` else None)."""
        a, q, w = self._attention(blk.attn, blk.norm1(x), prefix, prefix_weights)
        x = x + blk.drop_path1(blk.ls1(a))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x, (q if capture else None), w

    def _attention(
        self, attn: nn.Module, x: Tensor, prefix: tuple[Tensor, Tensor] | None, prefix_weights: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Attention whose queries are the T tokens and keys/values are [prefix; tokens].

        x: (B, T, D) normed input. Returns (output (B, T, D), queries (B, T, A), A = heads * head_dim,
        and with ``prefix_weights`` the softmax weights on the Lp prefix positions (B, H, T, Lp), else None).
        """
        B, T, _ = x.shape
        H, hd = attn.num_heads, attn.head_dim
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        q, k, v = attn.qkv(x).reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hd)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if prefix is not None:
            # The prefix lives in the key/value space the attention product sees (after k_norm).
            kp, vp = (
                self._heads(p, B, H, hd, name) for p, name in zip(prefix, ("key_prefix", "value_prefix"))
            )
            k, v = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
        weights = None
        if prefix_weights and prefix is not None:
            # The product with its weights materialised (no fused kernel returns them); no dropout: this
            # serves no-grad representation passes.
            w = attention_weights(q, k, attn.scale)
            out, weights = w @ v, w[..., : k.shape[2] - T]
        else:
            out = self._product(attn, q, k, v)
        out = out.transpose(1, 2).reshape(B, T, H * hd)
        if getattr(attn, "norm", None) is not None:  # scale_norm (newer timm); absent in older releases
            out = attn.norm(out)
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))
        return out, q.transpose(1, 2).reshape(B, T, H * hd), weights

    @staticmethod
    def _heads(p: Tensor, B: int, H: int, hd: int, name: str) -> Tensor:
        """(B, Lp, H*hd) -> (B, H, Lp, hd)."""
        p = _batched(p, B, name)
        if p.shape[-1] != H * hd:
            raise ValueError(f"{name} must be (B, Lp, {H * hd}), got {tuple(p.shape)}")
        return p.reshape(B, p.shape[1], H, hd).transpose(1, 2)

    def _product(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(hd)) v over (B, H, T, hd) x (B, H, S, hd) -> (B, H, T, hd)."""
        p = attn.attn_drop.p if attn.training else 0.0
        if self._fused_for(q):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=attn.scale)
        return plain_product(q, k, v, attn.scale, drop=attn.attn_drop)


def _flat_patches(t: Tensor) -> Tensor:
    """patch_embed output -> (B, N, D) (dynamic_img_size models give (B, h, w, D))."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _batched(t: Tensor, B: int, name: str) -> Tensor:
    """Check a (B, L, D) input; a batch of 1 is shared across the batch."""
    if t.dim() != 3 or t.shape[0] not in (1, B):
        raise ValueError(f"{name} must be (B={B}, L, D) or (1, L, D), got {tuple(t.shape)}")
    return t.expand(B, -1, -1) if t.shape[0] != B else t


def _check_supported(vit: nn.Module) -> None:
    """PromptedViT drives timm Block/Attention modules directly: reject layouts it cannot drive."""
    from timm.models.vision_transformer import Attention, Block  # both names exist in every timm 1.x

    if getattr(vit, "cls_token", None) is None:
        raise ConfigError(
            "this ViT has no class token; prompts go after CLS: pick an arch with class_token=True"
        )
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise ConfigError(
                f"block {i} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}; "
                "PromptedViT supports timm's standard Block with Attention: pick a plain vit_* arch"
            )
        if blk.attn.qkv.out_features != 3 * blk.attn.num_heads * blk.attn.head_dim:
            raise ConfigError(f"block {i} has an unusual qkv layout; pick a plain vit_* arch")
