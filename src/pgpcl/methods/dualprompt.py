"""DualPrompt (Wang et al., ECCV 2022), and DualPrompt-PGP with ``pgp.enabled=true``.

Prefix-tuning: at each prompted layer a prompt is a key-prefix and a value-prefix (L tokens each)
joined to that layer's attention keys and values; queries are the image tokens only. A task-shared
G-prompt sits at ``g_layers`` and a pool of E-prompts (one per task, picked top-1 by key matching, forced
to the true task in training) at ``e_layers``. A pool smaller than the number of tasks (the released
20-split config: 10 E-prompts) forces only the tasks it has a prompt for; a later task picks among them
by key matching in training too (batch-wise with ``batchwise_prompt``), as the released prompt mask
does. The classifier reads the CLS output.

Unlike the released code, key- and value-prefixes are split by indexing their own axis, never by a
reshape that mixes them across the batch.

PGP: the key-prefixes of the G-prompt and of the E-prompts are protected, one basis per layer, spanned
by that layer's queries W_q LN(x) of the task's data (eps 0.50), built after each task
(``key_basis=head``: one per layer and head). The memory pass
selects E-prompts exactly as training does (the true task's prompt, or for a task past the pool the one
key matching picks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS
from pgpcl.methods.base import Method, MethodOutput, check_at_least, check_block_list, check_blocks_exist
from pgpcl.methods.vit_common import (
    KeyPrefixBases,
    PromptedViTMethod,
    init_head,
    init_prompt_,
    pool_key_prefix_view,
)


@METHODS.register("dualprompt")
class DualPrompt(PromptedViTMethod, Method):
    @dataclass
    class Params:
        g_length: int = 5
        g_layers: list[int] = field(default_factory=lambda: [0, 1])
        e_length: int = 5
        e_layers: list[int] = field(default_factory=lambda: [2, 3, 4])
        pool_size: int | None = None
        """Number of E-prompts; None = one per task. Fewer than the tasks: tasks past the pool pick theirs by
        key matching (released 20-split config: 10)."""
        top_k: int = 1
        """Must be 1: one E-prompt per image (a key of the released configs)."""
        batchwise_prompt: bool = True
        """Training of a task past the pool (``pool_size`` below the number of tasks): one E-prompt for the
        whole batch, the most chosen. Otherwise inert: training uses the true task's E-prompt (the released
        prompt mask). Evaluation follows ``test_batchwise``."""
        test_batchwise: bool = False
        pull_lambda: float = 1.0
        head: Literal["token", "prompt"] = "token"
        """'token': the [CLS] token's output (as released); 'prompt': the mean of the image tokens' outputs
        (prefixes add no tokens to average, so this is the patch tokens, without [CLS] and register tokens)."""
        prompt_init: Literal["uniform", "zero", "normal"] = "uniform"
        shared_prompt_pool: bool = False
        """Before training task t > 0, copy E-prompt t-1 (key- and value-prefixes, not its matching key)
        into E-prompt t, as the released configs do (``--shared_prompt_pool``); the released-benchmark
        presets set it."""
        key_basis: Literal["layer", "head"] = "layer"
        """PGP's key-prefix bases: one per layer over full-width queries (as released), or one per layer and
        attention head, which keeps each head's logits rather than their sum (docs/pgp.md, section 14)."""

        def validate(self) -> None:
            check_block_list(self.g_layers, "g_layers", empty_ok=True, null_ok=False)
            check_block_list(self.e_layers, "e_layers", null_ok=False)
            if set(self.g_layers) & set(self.e_layers):
                raise ConfigError("method.g_layers and method.e_layers overlap; give each layer one prompt")
            if self.top_k != 1:
                raise ConfigError("method.top_k must be 1 for DualPrompt (one E-prompt per image)")
            check_at_least(self, 1, "g_length", "e_length", "pool_size")
            check_at_least(self, 0, "pull_lambda")

    default_eps = {"prefix": 0.50}
    basis_timing = "task_end"
    ddp_find_unused_parameters = False  # prompt pools are whole tensors: always used

    def __init__(self, params: Params, backbone: nn.Module, num_classes: int, task_classes):
        super().__init__(params, num_classes, task_classes)
        from pgpcl.models import PromptPool

        self.backbone = backbone
        d, depth = backbone.embed_dim, backbone.depth
        check_blocks_exist(params.g_layers, depth, "g_layers")
        check_blocks_exist(params.e_layers, depth, "e_layers")
        pool_size = params.pool_size or len(task_classes)
        g_shape = (len(params.g_layers), 2, params.g_length, d)
        self.g_prompt = nn.Parameter(torch.empty(g_shape)) if params.g_layers else None
        if self.g_prompt is not None:
            init_prompt_(self.g_prompt, params.prompt_init)
        e_shape = (len(params.e_layers), 2, params.e_length, d)
        self.pool = PromptPool(pool_size, e_shape, d, init=params.prompt_init)
        self.head = init_head(nn.Linear(d, num_classes))

    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        if self.params.shared_prompt_pool and 0 < task < self.pool.pool_size:
            with torch.no_grad():  # a new task starts from what the previous one learned
                self.pool.prompts[task].copy_(self.pool.prompts[task - 1])

    def whole_batch(self, x: Tensor, task: Tensor):
        """A task past the pool: the batch-wise E-prompt vote of a training step taken once, over the
        whole batch x (B, C, H, W). A task with an E-prompt of its own needs no vote."""
        if not (self.training and self.params.batchwise_prompt) or self._forced(task) is not None:
            return contextlib.nullcontext()
        return self._vote_on_whole_batch(x, 1)

    def _prefixes(self, x: Tensor, task: Tensor | None, query: Tensor | None = None):
        """E-prompt selection (forced to ``task`` when given; ``query`` (B, D) given or computed) and the
        per-layer prefix dict."""
        p = self.params
        batchwise = p.batchwise_prompt if self.training else p.test_batchwise
        q = self.backbone.query(x) if query is None else query
        forced = self._forced(task)
        if forced is None and self._batch_ids is not None and self.training:  # a piece of a voted batch
            forced = self._batch_ids.expand(q.shape[0], -1)
        sel = self.pool.select(q, 1, batchwise=batchwise, force_idx=forced)
        return sel, self._prefix_dict(self.pool.gather(sel.idx)[:, 0])

    def _forced(self, task: Tensor | None) -> Tensor | None:
        """The E-prompt ids to force for a batch of ``task`` ids (B,): the true task's, or None (choose by
        key matching) for a task past the pool, like the released prompt mask. One task per batch."""
        if task is None:
            return None
        past = task >= self.pool.pool_size
        if not bool(past.any()):
            return task
        if not bool(past.all()):
            raise ValueError(f"a batch mixes tasks with and without an E-prompt of their own (pool of "
                             f"{self.pool.pool_size}); give one task per batch")
        return None

    def _prefix_dict(self, e: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        """Chosen E-prompts e (B, n_e_layers, 2, L, D) and the G-prompt -> {layer: (key, value)}."""
        from pgpcl.models import join_layer_prefixes

        p = self.params
        prefixes = join_layer_prefixes(e, p.e_layers)
        if self.g_prompt is not None:
            g = self.g_prompt.unsqueeze(0).expand(e.shape[0], *self.g_prompt.shape)
            prefixes.update(join_layer_prefixes(g, p.g_layers))
        return prefixes

    def forward(self, x: Tensor, task: Tensor | None = None, query: Tensor | None = None) -> MethodOutput:
        sel, prefixes = self._prefixes(x, task, query)
        if self.params.head == "token":
            feat = self.backbone.forward_features(x, prefixes=prefixes, out_rows=1).tokens[:, 0]
        else:
            r = self.backbone.num_prefix_tokens  # [CLS] (+ register tokens)
            feat = self.backbone.forward_features(x, prefixes=prefixes).tokens[:, r:].mean(dim=1)
        aux = -self.params.pull_lambda * sel.key_sim.mean()
        return MethodOutput(self.head(feat), aux, {"prompt_idx": sel.idx})

    # -- PGP ---------------------------------------------------------------------------------------
    def _prefixed_layers(self) -> list[tuple[str, nn.Parameter, int, int]]:
        """(group name, parameter, index of the layer in that parameter, layer) for every prefixed layer."""
        out = [(f"g_key.l{layer}", self.g_prompt, i, layer) for i, layer in enumerate(self.params.g_layers)]
        out += [(f"e_key.l{layer}", self.pool.prompts, i, layer) for i, layer in enumerate(self.params.e_layers)]
        return out

    def _keys(self) -> KeyPrefixBases:
        entries = [(name, param, _g_key_view(i) if param is self.g_prompt else pool_key_prefix_view(i), layer)
                   for name, param, i, layer in self._prefixed_layers()]
        bb = self.backbone
        return KeyPrefixBases(entries, self.params.key_basis == "head", bb.num_heads, bb.embed_dim)

    def protected_groups(self, eps: dict[str, float]):
        # components=50: PCA width of the released arithmetic (pgp.mode=reference only).
        return self._keys().groups("prefix", eps["prefix"], components=50)

    @torch.no_grad()
    def representations(self, x: Tensor, task: Tensor) -> dict[str, Tensor]:
        """Per prefixed layer, the queries W_q LN(x) of the prompted forward: (B, T, D).

        The E-prompt is chosen as in training: the true task's, so no query pass is needed, or for a task
        past the pool the one key matching picks (batch-wise with ``batchwise_prompt``). The blocks run
        only up to the last prefixed layer (``PromptedViT.queries``).
        """
        layers = [layer for *_, layer in self._prefixed_layers()]
        force = self._forced(task)
        if force is None:
            idx = self.pool.select(self.backbone.query(x), 1, batchwise=self.params.batchwise_prompt).idx
        else:
            idx = self.pool.forced_ids(force, x.shape[0])
        queries = self.backbone.queries(x, layers, prefixes=self._prefix_dict(self.pool.gather(idx)[:, 0]))
        return self._keys().rows(queries)


def _g_key_view(i: int):
    """The key-prefix of G-prompt layer i: (L, D) out of (n_layers, 2, L, D)."""
    return lambda t: t[i, 0]
