"""CLIP prompt learner (the CLIP-PGP baseline of Qiao et al., ICLR 2024), and CLIP-PGP with ``pgp.enabled=true``.

Frozen open_clip CLIP. Image side: one shared image prompt of P tokens inserted right after the CLS
token, after the positional embedding and before ``ln_pre`` (see :mod:`pgpcl.models.clip`). Text side:
one CoOp-style learnable context of ``text_length`` (16) tokens per task, followed by the class name:
``[SOT] ctx_1 ... ctx_16 <class name> . [EOT]``. Logits = cosine(image feature, text feature) x the
model's logit scale.

Training (task t): ``forward`` returns logits over *all* classes; the current task's text features are
computed from its context with gradients, every other task's from its own context without gradients
(cached), and the base :meth:`Method.loss` keeps the current task's classes (cross-entropy within the
task, as released). Only the image prompt and the current task's context require gradients and are
handed to the optimizer; every context is saved in checkpoints.

Evaluation: :meth:`predict` scores every image against the text features of all classes, each class with
its own task's context; no label or task information is used (the released "CIL" evaluation kept the
classes up to the highest task id among the batch's labels, which leaks labels). The engine masks to the
seen classes (CIL) or to the true task's classes (TIL).

PGP: the image prompt is protected (kind ``prompt``, eps 0.90, built after each task); its old space is
the embedded image tokens (CLS + patches + positions, before the prompt) of the task's data plus the
prompt rows (sum space). Text contexts are not projected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS
from pgpcl.methods.base import Method, MethodOutput
from pgpcl.methods.vit_common import TunedModulesPGP, init_prompt_

CTX_WORD = "X"
"""Placeholder word whose token embeddings the learned context replaces (CoOp)."""


@dataclass
class TextParams:
    """The text side's settings, shared by the CLIP learners (their Params derive from it)."""

    text_length: int = 16
    """Learned context tokens per task before the class name (CoOp)."""
    text_init_std: float = 0.02
    """Std of the normal init of the text contexts (CoOp's generic context)."""
    first_task_lr: float | None = None
    """lr of task 0 (released: 0.001); None = train.lr. Later tasks use train.lr (released: 0.01)."""
    first_task_weight_decay: float | None = None
    """Weight decay of task 0 (released: 5e-4); None = train.weight_decay (released later: 2e-4)."""
    cache_text: bool = True
    """Cache the text features of contexts not being trained (recomputed whenever a context changes)."""

    def validate(self) -> None:
        if self.text_length < 1:
            raise ConfigError(f"method.text_length must be >= 1, got {self.text_length}")
        if not self.text_init_std >= 0:
            raise ConfigError(f"method.text_init_std must be >= 0, got {self.text_init_std}")
        if self.first_task_lr is not None and self.first_task_lr <= 0:
            raise ConfigError(f"method.first_task_lr must be > 0, got {self.first_task_lr}")
        if self.first_task_weight_decay is not None and self.first_task_weight_decay < 0:
            raise ConfigError("method.first_task_weight_decay must be >= 0")


class CLIPTextLearner(Method):
    """A frozen CLIP with one learned CoOp context per task on the text side, and an image side that a
    subclass tunes (:meth:`image_parameters`, :meth:`encode_image`). Logits, the per-task optimiser
    settings, checkpoints and the text-feature cache are the same for every image side."""

    basis_timing = "task_end"
    # Every step uses the image side's parameters and the current context, the only ones requiring grad.
    ddp_find_unused_parameters = False

    def __init__(
        self, params, backbone: nn.Module, num_classes: int, task_classes, class_names: list[str]
    ):
        super().__init__(params, num_classes, task_classes)
        if len(class_names) != num_classes:
            raise ConfigError(f"the scenario gives {len(class_names)} class names for {num_classes} classes")
        if sorted(c for classes in task_classes for c in classes) != list(range(num_classes)):
            raise ConfigError(
                "the CLIP learners need tasks with disjoint classes (data.setting cil, til or online); in dil "
                "every task holds all classes and one context per task would need a domain selector at test time"
            )
        self.backbone = backbone
        self.init_image_side(backbone)  # first: a seeded run draws the image side's init before the contexts'
        dt = backbone.text_width
        self.text_ctx = nn.ParameterList(
            [nn.Parameter(torch.randn(params.text_length, dt) * params.text_init_std) for _ in task_classes]
        )
        ids, start = self._tokenize_tasks(class_names)
        self.ctx_start = start
        for t, ids_t in enumerate(ids):
            self.register_buffer(f"text_ids_{t}", ids_t, persistent=False)
        self._text_cache: dict[int, tuple[tuple, Tensor]] = {}

    @classmethod
    def build(cls, cfg, scenario) -> CLIPTextLearner:
        from pgpcl.models.clip import PromptedCLIP, build_clip

        if cfg.data.channels != 3:
            raise ConfigError(f"CLIP takes RGB images: set data.channels=3 (got {cfg.data.channels})")
        if cfg.backbone.compile:
            raise ConfigError("backbone.compile is implemented for the ViT methods only; set backbone.compile=false")
        clip, tokenizer, info = build_clip(cfg.backbone)
        backbone = PromptedCLIP(clip, tokenizer)
        if cfg.data.img_size != backbone.image_size:
            raise ConfigError(
                f"data.img_size ({cfg.data.img_size}) differs from the CLIP image size ({backbone.image_size}); "
                f"set backbone.img_size={cfg.data.img_size} (position embeddings are resized) or "
                f"data.img_size={backbone.image_size}"
            )
        method = cls(
            cfg.method.params, backbone, scenario.num_classes, scenario.task_classes, scenario.class_names
        )
        method.weights_info = info
        return method

    # -- text prompts --------------------------------------------------------------------------------
    def _tokenize_tasks(self, class_names: list[str]) -> tuple[list[Tensor], int]:
        """Token ids (C_t, L) of ``X X ... X <name>.`` per task, and the position of the first X."""
        n = self.params.text_length
        prefix = " ".join([CTX_WORD] * n)
        bb = self.backbone
        tok = bb.tokenizer
        if hasattr(tok, "encode"):
            x_id = int(tok.encode(CTX_WORD)[0])
        else:  # the most frequent token of "X X ... X"
            x_ids = bb.tokenize([" ".join([CTX_WORD] * max(n, 3))])[0]
            x_id = int(torch.mode(x_ids[x_ids != 0]).values)
        out, start = [], None
        for classes in self.task_classes:
            texts = [f"{prefix} {class_names[c].replace('_', ' ')}." for c in classes]
            if hasattr(tok, "encode"):
                for text in texts:
                    need = len(tok.encode(text)) + 2  # + start / end of text
                    if need > bb.context_length:
                        raise ConfigError(
                            f"text prompt '{text}' needs {need} tokens, the CLIP context holds {bb.context_length}; "
                            "lower method.text_length or use a model with a longer context"
                        )
            ids = bb.tokenize(texts)
            for row, text in zip(ids, texts):
                hits = (row == x_id).nonzero().flatten()
                if len(hits) < n or not torch.equal(row[hits[0] : hits[0] + n], torch.full((n,), x_id)):
                    raise ConfigError(
                        f"cannot locate the {n} context tokens in the tokenized prompt '{text}'"
                    )
                if start is None:
                    start = int(hits[0])
                elif int(hits[0]) != start:
                    raise ConfigError("the context tokens start at different positions across prompts")
            out.append(ids)
        return out, int(start or 0)

    def _text_ids(self, t: int) -> Tensor:
        return getattr(self, f"text_ids_{t}")

    def _encode_task_text(self, t: int) -> Tensor:
        """Normalised text features (C_t, E) of task t's classes with task t's context."""
        ids = self._text_ids(t)
        emb = self.backbone.token_embedding(ids)
        ctx = self.text_ctx[t].to(emb.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
        s, n = self.ctx_start, self.params.text_length
        emb = torch.cat([emb[:, :s], ctx, emb[:, s + n :]], dim=1)
        return F.normalize(self.backbone.encode_text_embeddings(emb, ids).float(), dim=-1)

    def _cached_task_text(self, t: int) -> Tensor:
        """Task t's text features without gradients, recomputed when its context has changed."""
        p = self.text_ctx[t]
        key = (p._version, p.data_ptr(), p.device, p.dtype)
        hit = self._text_cache.get(t)
        if hit is not None and hit[0] == key and self.params.cache_text:
            return hit[1]
        with torch.no_grad():
            feats = self._encode_task_text(t)
        self._text_cache[t] = (key, feats)
        return feats

    def text_features(self, trainable_task: int | None = None) -> Tensor:
        """(num_classes, E) normalised text features of all classes, in class order; only
        ``trainable_task``'s are computed with gradients."""
        parts = [
            self._encode_task_text(t) if t == trainable_task else self._cached_task_text(t)
            for t in range(len(self.task_classes))
        ]
        feats = torch.cat(parts, dim=0)
        order = [c for classes in self.task_classes for c in classes]
        if order != list(range(self.num_classes)):  # rows are in task order: put them in class order
            feats = feats[torch.argsort(torch.tensor(order, device=feats.device))]
        return feats

    # -- image side (the subclass's) ----------------------------------------------------------------
    def init_image_side(self, backbone: nn.Module) -> None:
        """Create (and initialise) what the image side trains; ``self.params`` is set."""
        raise NotImplementedError

    def image_parameters(self) -> dict[str, nn.Parameter]:
        """{state-dict name: parameter} of everything the image side trains."""
        raise NotImplementedError

    def encode_image(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E) image features (not normalised), through the tuned image side."""
        raise NotImplementedError

    # -- forward -------------------------------------------------------------------------------------
    def image_features(self, x: Tensor) -> Tensor:
        """(B, E) normalised image features."""
        return F.normalize(self.encode_image(x).float(), dim=-1)

    def forward(self, x: Tensor, task: Tensor | None = None) -> MethodOutput:
        """Logits (B, num_classes). ``task`` is not used: in training the current task's context is the
        trainable one; the loss's class mask restricts the cross-entropy to the current task."""
        trainable = self.current_task if (self.training and torch.is_grad_enabled()) else None
        img = self.image_features(x)
        txt = self.text_features(trainable)
        return MethodOutput(self.backbone.logit_scale().float() * img @ txt.T)

    @torch.no_grad()
    def predict(self, x: Tensor, query: Tensor | None = None) -> Tensor:
        """(B, num_classes) cosine x logit scale against every class's text feature; no labels, no task ids."""
        img = self.image_features(x)
        return self.backbone.logit_scale().float() * img @ self.text_features(None).T

    # -- optimisation --------------------------------------------------------------------------------
    def begin_task(self, task: int) -> None:
        """Only task ``task``'s context needs gradients from now on; the others are fixed."""
        super().begin_task(task)
        for t, ctx in enumerate(self.text_ctx):
            ctx.requires_grad_(t == task)
        self._text_cache.clear()

    def task_optimizer_settings(self, task: int, lr: float, weight_decay: float) -> tuple[float, float]:
        """Task 0: ``first_task_lr`` / ``first_task_weight_decay`` (released 0.001 / 5e-4); later: train.*."""
        p = self.params
        if task == 0:
            lr = p.first_task_lr if p.first_task_lr is not None else lr
            weight_decay = (
                p.first_task_weight_decay if p.first_task_weight_decay is not None else weight_decay
            )
        return lr, weight_decay

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The image side's parameters and the current task's text context (past and future contexts stay
        fixed)."""
        return [*self.image_parameters().values(), self.text_ctx[self.current_task]]

    def _learned_names(self) -> list[str]:
        return [*self.image_parameters()] + [f"text_ctx.{t}" for t in range(len(self.text_ctx))]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The image side's parameters and every task's text context (trained, or still at its initial
        value)."""
        own = dict(self.named_parameters())
        return {n: own[n].detach().clone() for n in self._learned_names()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        from pgpcl.methods.base import copy_trainable_state

        own = dict(self.named_parameters())
        copy_trainable_state({n: own[n] for n in self._learned_names()}, state)
        self._text_cache.clear()

    def train(self, mode: bool = True) -> CLIPTextLearner:
        super().train(mode)
        self._text_cache.clear()
        return self

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .half(): cached features would be stale
        self._text_cache = {}
        return super()._apply(fn, *args, **kwargs)


class TunedImageTower(TunedModulesPGP):
    """Image side for CLIP learners that train modules added inside the image tower (adapters, LoRA,
    prefixes): the subclass's :meth:`add_modules` puts them into ``method.blocks`` of
    ``visual.transformer.resblocks``; PGP comes from :class:`TunedModulesPGP`."""

    def init_image_side(self, backbone: nn.Module) -> None:
        self.attach_tuned(backbone.clip.visual.transformer.resblocks, backbone.embed_dim, self.params.blocks)

    def image_parameters(self) -> dict[str, nn.Parameter]:
        """The added modules' trainable weights under their state-dict names (``backbone.clip.visual...``)."""
        mine = {id(q) for m in self.tuned.values() for q in m.parameters() if q.requires_grad}
        return {n: q for n, q in self.named_parameters() if id(q) in mine}

    def encode_image(self, x: Tensor) -> Tensor:
        return self.backbone.encode_image(x)

    def capture_forward(self, x: Tensor) -> None:
        self.backbone.encode_image(x)


@METHODS.register("clip_prompt")
class CLIPPrompt(CLIPTextLearner):
    @dataclass
    class Params(TextParams):
        length: int = 10
        """Image prompt tokens P (released config: 10; the paper's appendix says 5)."""
        prompt_init: Literal["kaiming", "uniform", "normal", "zero"] = "kaiming"
        """kaiming: U(-1/sqrt(D), 1/sqrt(D)), the released nn.Linear init; uniform: U(-1, 1); normal: std 0.02."""

        def validate(self) -> None:
            if self.length < 1:
                raise ConfigError(f"method.length must be >= 1, got {self.length}")
            super().validate()

    default_eps = {"prompt": 0.90}

    def init_image_side(self, backbone: nn.Module) -> None:
        self.image_prompt = nn.Parameter(torch.empty(self.params.length, backbone.embed_dim))
        _init_prompt_(self.image_prompt, self.params.prompt_init)

    def image_parameters(self) -> dict[str, nn.Parameter]:
        return {"image_prompt": self.image_prompt}

    def encode_image(self, x: Tensor) -> Tensor:
        return self.backbone.encode_image(x, self.image_prompt)

    # -- PGP -----------------------------------------------------------------------------------------
    def protected_groups(self, eps: dict[str, float]):
        from pgpcl.projection import ProtectedGroup

        # components=5: PCA width of the released arithmetic (pgp.mode=reference only).
        return [ProtectedGroup("prompt", "prompt", self.image_prompt, None, eps["prompt"], components=5)]

    @torch.no_grad()
    def representations(self, x: Tensor, task: Tensor) -> dict[str, Tensor]:
        """Embedded image tokens (B, 1+N, D): CLS + patches with positions, before the prompt."""
        return {"prompt": self.backbone.embed(x)}

    @torch.no_grad()
    def extra_representations(self) -> dict[str, Tensor]:
        """The image prompt rows (P, D): the prompt half of the sum space."""
        return {"prompt": self.image_prompt.detach().clone()}


def _init_prompt_(t: Tensor, kind: str) -> None:
    if kind == "kaiming":  # nn.Linear(D, P).weight as released: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(D))
        bound = 1.0 / math.sqrt(t.shape[-1])
        nn.init.uniform_(t, -bound, bound)
    else:
        init_prompt_(t, kind)
