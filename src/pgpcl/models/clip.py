"""The frozen open_clip backbone of the CLIP prompt learner, and its prompted image / text forward.

:func:`build_clip` builds any open_clip model by name (``backbone.arch``, e.g. ``ViT-B-16``), a model
config pgpcl defines (:data:`CLIP_CONFIGS`, e.g. the tiny offline ``pgpcl-tiny-clip``) or an open_clip
model-config JSON file, and loads its weights:

* ``backbone.weights=null``: random init (works offline; smoke tests);
* ``backbone.weights=hub`` + ``backbone.pretrained_tag`` (e.g. ``openai``): open_clip's pretrained tag,
  downloaded once by open_clip (Hugging Face hub), then read by pgpcl like a local file. QuickGELU
  follows the tag: OpenAI weights use QuickGELU, so ``ViT-B-16`` + ``openai`` builds the QuickGELU
  variant (open_clip's own ``create_model`` only warns about the mismatch);
* ``backbone.weights=/path/to/file``: a ``.safetensors`` or ``.pth``/``.bin``/``.pt`` *state dict*
  (``torch.load(weights_only=True)``: no pickled code ever runs). OpenAI's original ``ViT-B-16.pt`` is
  a TorchScript archive that cannot be read without executing its code: it is refused with a one-line
  :class:`~pgpcl.errors.CheckpointError` that says how to convert it.

Every key is checked against the model (missing, unexpected or wrong-shaped -> one-line error), after
open_clip's own conversions (positional-embedding resizing for another ``backbone.img_size``, the
custom-text layout, ``logit_scale`` shape).

:class:`PromptedCLIP` freezes the model and drives open_clip's modules, without forking its files:
the visual ``conv1``, ``class_embedding``, ``positional_embedding``, ``patch_dropout``, ``ln_pre``,
``transformer``, ``_pool`` and ``proj``; the text tower's ``token_embedding``, ``positional_embedding``,
``transformer`` (with its causal mask), ``ln_final``, ``text_projection`` and open_clip's
``text_global_pool``.

**Where the image prompt goes** (as released in the CLIP-PGP code): the sequence is built as
``[CLS, patches] + positional embedding``; the P prompt tokens are then inserted right after CLS,
*without* a positional embedding of their own, and the whole sequence ``[CLS, prompts, patches]`` goes
through ``ln_pre`` and the transformer. The prompt tokens are dropped again before pooling, so
average-pooling models pool the image tokens only (CLS-pooling models, like all OpenAI CLIPs, read CLS).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgpcl.config import BackboneConfig
from pgpcl.errors import CheckpointError, ConfigError, describe
from pgpcl.io import is_torchscript
from pgpcl.models.attention import plain_product, plain_product_preferred
from pgpcl.models.frozen import train_keeping_frozen
from pgpcl.models.weights import (
    WeightsInfo,
    _unwrap,
    check_state_dict,
    hub_cache_only_if_unreachable,
    read_state_dict,
)

# Model configs pgpcl defines, in open_clip's format ({embed_dim, vision_cfg, text_cfg}). The tiny one is
# for tests and the offline smoke presets: random weights, seconds on a CPU, the real BPE tokenizer
# (its vocabulary ships in the open_clip wheel).
CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "pgpcl-tiny-clip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}

CLIP_FILE_EXT = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_SUPPORTED = ".safetensors or .pth/.bin state dict"


# ----------------------------------------------------------------------------------------------------
# Model configs


def clip_model_config(arch: str) -> dict[str, Any]:
    """The open_clip model config of ``arch``: a pgpcl config, an open_clip built-in, or a JSON file.

    Raises ConfigError for an unknown name (with the nearest known one).
    """
    import open_clip

    if arch in CLIP_CONFIGS:
        return copy.deepcopy(CLIP_CONFIGS[arch])
    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"CLIP model config file '{arch}' not found; give an existing open_clip config JSON"
            )
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"CLIP model config '{arch}' is not valid JSON ({describe(e, 100)})") from None
        raw = raw.get("model_cfg", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict) or not all(k in raw for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ConfigError(
                f"CLIP model config '{arch}' needs embed_dim, vision_cfg and text_cfg (open_clip format)"
            )
        return raw
    name = arch.replace("/", "-")  # 'ViT-B/16' (OpenAI spelling) -> 'ViT-B-16', as open_clip does
    cfg = open_clip.get_model_config(name) if not name.startswith(("hf-hub:", "local-dir:")) else None
    if cfg is None:
        known = list(CLIP_CONFIGS) + open_clip.list_models()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; see open_clip.list_models()"
        raise ConfigError(f"unknown CLIP backbone.arch '{arch}'{hint}")
    return cfg


def _apply_overrides(model_cfg: dict[str, Any], cfg: BackboneConfig) -> dict[str, Any]:
    """backbone.img_size/patch_size/embed_dim/depth/num_heads act on the *vision* tower."""
    if cfg.in_chans not in (None, 3):
        raise ConfigError(
            f"CLIP takes 3-channel images; backbone.in_chans={cfg.in_chans} is not supported (use 3)"
        )
    vision = model_cfg["vision_cfg"]
    if cfg.img_size is not None:
        vision["image_size"] = cfg.img_size
    if cfg.patch_size is not None:
        vision["patch_size"] = cfg.patch_size
    if cfg.embed_dim is not None:
        vision["width"] = cfg.embed_dim
    if cfg.depth is not None:
        vision["layers"] = cfg.depth
    if cfg.num_heads is not None:
        width = vision.get("width", 768)
        if width % cfg.num_heads:
            raise ConfigError(f"backbone.num_heads ({cfg.num_heads}) must divide the vision width ({width})")
        vision["head_width"] = width // cfg.num_heads
    return model_cfg


def create_clip(model_cfg: dict[str, Any]) -> nn.Module:
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` from a config dict, randomly initialised, in eval mode.

    Raises ConfigError for towers :class:`PromptedCLIP` cannot drive (timm or ResNet image towers,
    Hugging Face text towers, CoCa).
    """
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
        raise ConfigError(
            "the CLIP prompt learner needs an open_clip ViT image tower (not timm / ResNet); pick a ViT-* arch"
        )
    if "hf_model_name" in text or "multimodal_cfg" in cfg:
        raise ConfigError(
            "the CLIP prompt learner needs open_clip's own text transformer (not HF / CoCa); pick a ViT-* arch"
        )
    custom_text = cfg.pop("custom_text", False)
    try:
        model = (CustomTextCLIP if custom_text else CLIP)(**cfg)
    except Exception as e:  # open_clip asserts / raises on inconsistent sizes
        raise ConfigError(
            f"CLIP model cannot be built from {model_cfg} ({describe(e, 120, with_type=True)})"
        ) from e
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Weights


def read_clip_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a CLIP state dict from ``.safetensors`` / ``.pth`` / ``.bin`` without executing code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"CLIP weights file '{path}' not found; give an existing {_SUPPORTED}")
    if path.suffix.lower() not in CLIP_FILE_EXT:
        raise CheckpointError(f"CLIP weights file '{path}' has extension '{path.suffix}'; use a {_SUPPORTED}")
    if is_torchscript(path):
        raise CheckpointError(
            f"'{path}' is a TorchScript archive (OpenAI's original CLIP format), which cannot be loaded without "
            "executing its code; convert it once to a state dict (open_clip.create_model(arch, pretrained=PATH, "
            "weights_only=False) then safetensors.torch.save_file(model.state_dict(), 'clip.safetensors')) or use "
            "open_clip_model.safetensors from the Hugging Face hub"
        )
    return read_state_dict(path)


def _convert(sd: dict[str, Any], model: nn.Module, where: str) -> dict[str, Any]:
    """open_clip's own conversions of a CLIP state dict to ``model`` (see open_clip.factory.load_checkpoint)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    sd = _unwrap(sd)  # {'state_dict': ...} wrappers, 'module.' prefix
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI JIT-exported extras
        sd.pop(key, None)
    try:
        sd = convert_state_dict(model, sd)
        if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
            sd = convert_to_custom_text_state_dict(sd)
        for name in ("logit_scale", "logit_bias"):
            own = getattr(model, name, None)
            if name in sd and own is not None and own.ndim != sd[name].ndim:
                sd[name] = sd[name].reshape(own.shape)
        if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
            sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
    except Exception as e:  # shape asserts of open_clip's resizers, unknown layouts
        raise CheckpointError(
            f"CLIP weights {where} cannot be adapted to this model ({describe(e, 120, with_type=True)}); "
            "set backbone.arch to the model the file was made for"
        ) from e
    return sd


def load_clip_weights(model: nn.Module, path: str | os.PathLike, where: str | None = None) -> str:
    """Load a CLIP state-dict file into ``model``, every key checked; returns the file's sha256."""
    from pgpcl.io import sha256_file

    where = where or f"file '{path}'"
    sd = _convert(read_clip_state_dict(path), model, where)
    sd = check_state_dict(sd, model, where)
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    return sha256_file(path)


def _pretrained_cfg(arch: str, tag: str) -> dict[str, Any]:
    """open_clip's pretrained config of ``arch`` + ``tag``; ConfigError listing the tags when unknown."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    name = arch.replace("/", "-")
    pcfg = get_pretrained_cfg(name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        hint = (
            f"; available tags: {', '.join(tags)}"
            if tags
            else "; this arch has no open_clip pretrained weights"
        )
        raise ConfigError(f"open_clip has no pretrained weights '{name}' tag '{tag}'{hint}")
    return pcfg


def _hub_file_hint(pcfg: dict[str, Any]) -> str:
    """Where to get the weights by hand, for the offline error."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME

    hub = pcfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        filename = filename or HF_SAFE_WEIGHTS_NAME
        return f"{filename} from https://huggingface.co/{repo}"
    return pcfg.get("url", "") or pcfg.get("file", "")


def _download(pcfg: dict[str, Any]) -> str:
    """Download (or find in open_clip's / the hub's cache) the weights file of a pretrained config."""
    from open_clip.pretrained import download_pretrained

    path = download_pretrained(pcfg)
    if not path:
        raise FileNotFoundError("open_clip returned no file")
    return path


def fetch_clip_weights(arch: str, tag: str) -> str:
    """Local path of open_clip's pretrained ``arch``/``tag`` file; CheckpointError with the recipe offline."""
    pcfg = _pretrained_cfg(arch, tag)
    try:
        with hub_cache_only_if_unreachable():
            return _download(pcfg)
    except Exception as e:
        hint = _hub_file_hint(pcfg)
        raise CheckpointError(
            f"could not fetch open_clip weights '{arch}' tag '{tag}' (offline?): download {hint} where you have "
            f"internet and set backbone.weights=/path/to/that/file"
        ) from e


def build_clip(cfg: BackboneConfig) -> tuple[nn.Module, Any, WeightsInfo]:
    """Build the open_clip model of ``cfg`` and load its weights: (model in eval mode, tokenizer, WeightsInfo).

    ``cfg.arch``: open_clip model name, a pgpcl name from :data:`CLIP_CONFIGS`, or a config JSON path.
    ``cfg.weights``: None (random), ``'hub'`` (``cfg.pretrained_tag``), or a state-dict file path.
    """
    weights, tag = cfg.weights, cfg.pretrained_tag
    arch = cfg.arch
    if ":" in arch and not arch.startswith(("hf-hub:", "local-dir:")) and not arch.endswith(".json"):
        arch, _, arch_tag = arch.partition(":")  # 'ViT-B-16:openai'
        tag = tag or arch_tag
    model_cfg = _apply_overrides(clip_model_config(arch), cfg)
    if weights == "hub":
        if not tag:
            raise ConfigError(
                "backbone.weights=hub needs backbone.pretrained_tag (e.g. openai) for a CLIP backbone"
            )
        pcfg = _pretrained_cfg(arch, tag)
        # The activation the weights were trained with (QuickGELU for OpenAI's).
        model_cfg["quick_gelu"] = bool(pcfg.get("quick_gelu", False))
        model = create_clip(model_cfg)  # first: config mistakes surface before any download
        path = fetch_clip_weights(arch, tag)
        name = f"{arch.replace('/', '-')}.{tag}"
        info = WeightsInfo(f"hub:{name}", load_clip_weights(model, path, f"'{name}' ({path})"))
    elif weights is None:
        model, info = create_clip(model_cfg), WeightsInfo("random", None)
    elif weights.startswith("builtin:"):
        raise ConfigError(
            "builtin weights are timm ViTs; a CLIP backbone takes weights=hub or a state-dict file"
        )
    else:
        if tag:  # the file holds those weights (the offline recipe downloads the hub's file): their activation
            model_cfg["quick_gelu"] = bool(_pretrained_cfg(arch, tag).get("quick_gelu", False))
        model = create_clip(model_cfg)
        path = os.path.expanduser(weights)
        info = WeightsInfo(f"file:{os.path.abspath(path)}", load_clip_weights(model, path))
    return model.eval(), build_tokenizer(arch, model_cfg), info


def build_tokenizer(arch: str, model_cfg: dict[str, Any]):
    """The tokenizer of ``arch`` with the model's context length (CLIP's BPE ships in the open_clip wheel)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    text = model_cfg.get("text_cfg", {})
    length = int(text.get("context_length", 77))
    if (
        arch in CLIP_CONFIGS
        or arch.endswith(".json")
        or not (text.get("hf_tokenizer_name") or "siglip" in arch.lower())
    ):
        return SimpleTokenizer(context_length=length, **text.get("tokenizer_kwargs", {}))
    try:
        return open_clip.get_tokenizer(arch.replace("/", "-"), context_length=length)
    except Exception as e:  # HF tokenizers download their vocabulary
        raise CheckpointError(
            f"could not load the tokenizer of '{arch}' ({describe(e, 100, with_type=True)}; offline?)"
        ) from e


# ----------------------------------------------------------------------------------------------------
# Prompted forward


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP with an image prompt input and a text-embedding (CoOp) input.

    All CLIP parameters get ``requires_grad=False`` and the model stays in eval mode whatever
    ``.train()`` says. Image side: :meth:`embed` (the tokens PGP protects against), :meth:`encode_image`.
    Text side: :meth:`tokenize`, :meth:`token_embedding`, :meth:`encode_text_embeddings`.
    """

    def __init__(self, clip: nn.Module, tokenizer):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if not isinstance(getattr(clip, "visual", None), VisionTransformer):
            raise ConfigError(
                "the CLIP prompt learner needs an open_clip VisionTransformer image tower; pick a ViT-* arch"
            )
        text = getattr(clip, "text", clip)  # CustomTextCLIP keeps its text tower in .text, CLIP inline
        if not hasattr(text, "token_embedding") or getattr(text, "cls_emb", None) is not None:
            raise ConfigError(
                "the CLIP prompt learner needs open_clip's plain text transformer; pick a ViT-* arch"
            )
        if getattr(text, "use_pad_mask", False):
            raise ConfigError("text towers with a padding mask are not supported by the CLIP prompt learner")
        self.clip = clip
        self.tokenizer = tokenizer
        clip.requires_grad_(False)
        clip.eval()

    def train(self, mode: bool = True) -> PromptedCLIP:
        train_keeping_frozen(self, self.clip, mode)
        return self

    @property
    def _text(self) -> nn.Module:
        """The text tower's modules: ``clip.text`` (CustomTextCLIP) or ``clip`` itself (CLIP keeps them inline).
        A property, not an attribute, so the model is not registered twice in the state dict."""
        return getattr(self.clip, "text", self.clip)

    # -- sizes ---------------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        """D, the width of the image tokens (the image prompt's feature axis)."""
        return int(self.clip.visual.class_embedding.shape[-1])

    @property
    def text_width(self) -> int:
        return int(self._text.token_embedding.weight.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.clip.visual.image_size[0])

    @property
    def num_patches(self) -> int:
        g = self.clip.visual.grid_size
        return int(g[0] * g[1])

    @property
    def context_length(self) -> int:
        return int(self._text.positional_embedding.shape[0])

    def logit_scale(self) -> Tensor:
        """exp(logit_scale) of the model (a frozen scalar)."""
        return self.clip.logit_scale.exp().reshape(())

    # -- image ---------------------------------------------------------------------------------------

    def embed(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1+N, D): CLS + patch tokens with positional embedding, before prompts,
        patch dropout and ``ln_pre`` (the released CLIP-PGP representation)."""
        v = self.clip.visual
        h = v.conv1(x)
        h = h.reshape(h.shape[0], h.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(h.dtype).view(1, 1, -1).expand(h.shape[0], -1, -1)
        h = torch.cat([cls, h], dim=1)
        if h.shape[1] != v.positional_embedding.shape[0]:
            raise ValueError(
                f"image gives {h.shape[1] - 1} patches, the model has {v.positional_embedding.shape[0] - 1}: "
                f"feed {self.image_size}x{self.image_size} images"
            )
        return h + v.positional_embedding.to(h.dtype)

    def encode_image(self, x: Tensor, prompts: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) -> (B, E) image features (not normalised).

        prompts: (P, D), (1, P, D) or (B, P, D), inserted right after CLS (after the positional
        embedding, before ``ln_pre``), with no positional embedding of their own.
        """
        v = self.clip.visual
        h = v.patch_dropout(self.embed(x))  # identity in eval, and the model is always in eval
        p = 0
        if prompts is not None:
            if prompts.dim() == 2:
                prompts = prompts.unsqueeze(0)
            if (
                prompts.dim() != 3
                or prompts.shape[0] not in (1, h.shape[0])
                or prompts.shape[-1] != h.shape[-1]
            ):
                raise ValueError(
                    f"prompts must be (P, {h.shape[-1]}) or (B, P, {h.shape[-1]}), got {tuple(prompts.shape)}"
                )
            prompts = prompts.to(h.dtype).expand(h.shape[0], -1, -1)
            p = prompts.shape[1]
            h = torch.cat([h[:, :1], prompts, h[:, 1:]], dim=1)
        h = run_transformer(v.transformer, v.ln_pre(h))
        if p:
            h = torch.cat([h[:, :1], h[:, 1 + p :]], dim=1)  # pool the image tokens only
        pooled = self._pool(h)
        return pooled @ v.proj if v.proj is not None else pooled

    def _pool(self, h: Tensor) -> Tensor:
        v = self.clip.visual
        if hasattr(v, "_pool"):  # open_clip >= 2.24
            return v._pool(h)[0]
        h = v.ln_post(h)
        return h[:, 1:].mean(dim=1) if getattr(v, "pool_type", "tok") == "avg" else h[:, 0]

    # -- text ----------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> Tensor:
        """(n,) strings -> (n, context_length) token ids."""
        return self.tokenizer(texts, context_length=self.context_length)

    def token_embedding(self, ids: Tensor) -> Tensor:
        """(n, L) ids -> (n, L, Dt) frozen token embeddings."""
        return self._text.token_embedding(ids)

    def encode_text_embeddings(self, embeds: Tensor, ids: Tensor) -> Tensor:
        """Text features (n, E) from token embeddings (n, L, Dt) (some replaced by learned context
        vectors); ``ids`` (n, L) are the token ids, used only to find the pooled (end-of-text) position."""
        from open_clip.transformer import text_global_pool

        t = self._text
        cast = t.transformer.get_cast_dtype()
        length = embeds.shape[1]
        x = embeds.to(cast) + t.positional_embedding[:length].to(cast)
        mask = t.attn_mask
        if mask is not None:
            mask = mask[:length, :length]
        x = t.ln_final(run_transformer(t.transformer, x, mask))
        pool_type = getattr(t, "text_pool_type", None) or getattr(t, "pool_type", "argmax")
        eos = getattr(t, "text_eos_id", None) if t is self.clip else getattr(t, "eos_id", None)
        x = text_global_pool(x, ids, pool_type, eos_token_id=eos)
        proj = t.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(self, ids: Tensor) -> Tensor:
        """Plain text features (n, E) of token ids, through the same path (for checks)."""
        return self.encode_text_embeddings(self.token_embedding(ids), ids)


# ----------------------------------------------------------------------------------------------------
# The transformer, with the plain attention product where it is faster


def run_transformer(tr: nn.Module, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """open_clip ``Transformer`` forward on batch-first x (B, T, D) -> (B, T, D).

    ``tr(x, attn_mask=attn_mask)``, except in bf16 / fp16 on the CPU (:func:`plain_product_preferred`),
    where standard blocks run here with the plain softmax(QK^T)V product: open_clip's
    ``nn.MultiheadAttention`` would take torch's fused kernel, which is slower there. ``attn_mask``:
    additive float mask (T, T) (the text tower's causal mask) or None.
    """
    if not (plain_product_preferred(x) and _standard_blocks(tr, attn_mask)):
        return tr(x, attn_mask=attn_mask)
    for blk in tr.resblocks:
        x = _plain_block(blk, x, attn_mask)
    return x


def _standard_blocks(tr: nn.Module, attn_mask: Tensor | None) -> bool:
    """Every block is a plain batch-first self-attention ResidualAttentionBlock that _plain_block
    reproduces; anything else keeps open_clip's own forward."""
    from open_clip.transformer import ResidualAttentionBlock

    if not getattr(tr, "batch_first", False) or getattr(tr, "grad_checkpointing", False):
        return False
    if attn_mask is not None and not attn_mask.is_floating_point():
        return False
    for blk in tr.resblocks:
        a = getattr(blk, "attn", None)
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv") or not isinstance(a, nn.MultiheadAttention):
            return False
        if not (a.batch_first and a._qkv_same_embed_dim and a.bias_k is None and not a.add_zero_attn):
            return False
    return True


def _plain_block(blk: nn.Module, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    """ResidualAttentionBlock forward (B, T, D) -> (B, T, D) with the attention written out (no dropout:
    the frozen model is always in eval)."""
    a = blk.attn
    B, T, D = x.shape
    H = a.num_heads
    h = blk.ln_1(x)
    q, k, v = F.linear(h, a.in_proj_weight, a.in_proj_bias).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
    out = plain_product(q, k, v, (D // H) ** -0.5, attn_mask).transpose(1, 2).reshape(B, T, D)
    x = x + blk.ls_1(a.out_proj(out))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


__all__ = [
    "CLIP_CONFIGS",
    "PromptedCLIP",
    "build_clip",
    "build_tokenizer",
    "clip_model_config",
    "create_clip",
    "fetch_clip_weights",
    "is_torchscript",
    "load_clip_weights",
    "read_clip_state_dict",
    "run_transformer",
]
