"""CODA-Prompt (Smith et al., CVPR 2023), and CODA-Prompt-PGP with ``pgp.enabled=true``.

Prefix-tuning at ``layers`` (0-4 as published) with a prompt *assembled* per image instead of picked:
each layer has M components P_m (a key-prefix and a value-prefix of L tokens each), keys K_m and
attention vectors A_m (width D). For the frozen ViT's query q (final-norm CLS of the un-prompted image)
the weights are alpha_m = cos(q * A_m, K_m) and the layer's prefix is sum_m alpha_m P_m. The pool is
shared out over the tasks, M // num_tasks components each: task t trains its own slice and uses the
earlier ones frozen; at test time every component learned so far takes part. New components start
orthonormal to all earlier ones (Gram-Schmidt at the task's start, as in the authors' later code); an
optional penalty ``ortho_mu`` keeps K, A and P near orthonormal. Loss: cross-entropy over the current
task's classes. The classifier reads the CLS output.

PGP (not in either paper; pgpcl applies DualPrompt-PGP's rule): at every prefixed layer the key-prefix
half of the components is protected by the span of that layer's queries W_q LN(x) of the finished
tasks' data (eps 0.50, as DualPrompt's), built after each task from the same forward as training. This
keeps ``Q_old (sum_m alpha_m dP_m)^T = 0`` for any weights alpha; what it does not control is that
new components enter old images' prompts at all (their alpha on old images, through the trainable
K and A, is not projected): see docs/pgp.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS
from pgpcl.methods.base import Method, MethodOutput, check_at_least, check_block_list, check_blocks_exist
from pgpcl.methods.vit_common import KeyPrefixBases, PromptedViTMethod, init_head, pool_key_prefix_view


@METHODS.register("coda_prompt")
class CodaPrompt(PromptedViTMethod, Method):
    @dataclass
    class Params:
        pool_size: int = 100
        """Components in all, shared out equally over the tasks (M // num_tasks each)."""
        length: int = 4
        """Tokens in each of the key- and value-prefix (the paper's "prompt length 8" is 4 + 4)."""
        layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
        ortho_mu: float = 0.0
        """Weight of the orthogonality penalty mean((W W^T - I)^2) on K, A and P of every layer."""
        key_basis: Literal["layer", "head"] = "layer"
        """PGP's key-prefix bases: one per layer (DualPrompt-PGP's rule) or one per layer and attention head
        (each head's logits kept, not their sum; docs/pgp.md, section 14)."""

        def validate(self) -> None:
            check_at_least(self, 1, "pool_size", "length")
            check_block_list(self.layers, "layers", null_ok=False)
            if self.ortho_mu < 0:
                raise ConfigError(f"method.ortho_mu must be >= 0, got {self.ortho_mu}")

    default_eps = {"prefix": 0.50}
    basis_timing = "task_end"
    ddp_find_unused_parameters = False  # every tensor takes part in every step (old rows get zero grads)

    def __init__(self, params: Params, backbone: nn.Module, num_classes: int, task_classes):
        super().__init__(params, num_classes, task_classes)
        self.backbone = backbone
        d, depth = backbone.embed_dim, backbone.depth
        check_blocks_exist(params.layers, depth, "layers")
        n_tasks = len(task_classes)
        self.per_task = params.pool_size // n_tasks
        if self.per_task < 1:
            raise ConfigError(
                f"method.pool_size ({params.pool_size}) is smaller than the number of tasks ({n_tasks}); "
                "CODA-Prompt needs at least one component per task"
            )
        if self.per_task * n_tasks > d:
            raise ConfigError(
                f"{self.per_task * n_tasks} components ({self.per_task} per task) cannot be orthogonal keys of "
                f"width {d}; set method.pool_size <= {d}"
            )
        n = len(params.layers)
        M = params.pool_size
        self.components = nn.Parameter(torch.zeros(M, n, 2, params.length, d))
        """(M, n_layers, 2, L, D): axis 2 holds the key-prefix (0) and the value-prefix (1)."""
        self.keys = nn.Parameter(torch.zeros(M, n, d))
        self.attention = nn.Parameter(torch.zeros(M, n, d))
        self.head = init_head(nn.Linear(d, num_classes))
        self._init_components(0)

    # -- components ----------------------------------------------------------------------------------
    def _span(self, task: int) -> tuple[int, int]:
        """Rows [start, stop) of the pool that ``task`` trains."""
        return task * self.per_task, (task + 1) * self.per_task

    @torch.no_grad()
    def _init_components(self, task: int) -> None:
        """Give ``task``'s rows random values orthonormal, per layer, to each other and to every earlier row."""
        start, stop = self._span(task)
        for t in (self.components, self.keys, self.attention):
            for i in range(t.shape[1]):
                rows = t[:stop, i].reshape(stop, -1)
                rows[start:] = orthonormal_rows(rows[:start], stop - start)
                t[:stop, i] = rows.reshape(t[:stop, i].shape)

    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        if task > 0:
            self._init_components(task)

    def _pool(self, t: Tensor, training: bool) -> Tensor:
        """The rows in use: the current task's trainable, the earlier ones frozen (detached)."""
        start, stop = self._span(self.current_task)
        if not training or start == 0:
            return t[:stop]
        return torch.cat([t[:start].detach(), t[start:stop]])

    def weights(self, query: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
        """alpha (B, n_layers, m) = cos(q * A_m, K_m) for queries (B, D) and keys, attention (m, n_layers, D).

        Computed as q (A K)^T / (|q * A| |K|) with matrix products, never materialising the
        (B, m, n_layers, D) tensor of attended queries (200 MB at the released sizes).
        """
        eps = 1e-12  # as F.normalize
        dot = torch.einsum("bd,mnd->bnm", query, attention * keys)
        q_norm = torch.einsum("bd,mnd->bnm", query.square(), attention.square()).clamp_min(eps**2).sqrt()
        k_norm = keys.norm(dim=-1).clamp_min(eps).transpose(0, 1)  # (n_layers, m)
        return dot / (q_norm * k_norm)

    def prefixes(self, query: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        """The assembled prefixes {layer: (key (B, L, D), value (B, L, D))} for queries (B, D)."""
        from pgpcl.models import join_layer_prefixes

        train = self.training
        alpha = self.weights(query, self._pool(self.keys, train), self._pool(self.attention, train))
        prompts = torch.einsum("bnm,mnkld->bnkld", alpha, self._pool(self.components, train))
        return join_layer_prefixes(prompts, self.params.layers)

    def ortho_penalty(self) -> Tensor:
        """sum over K, A, P and layers of mean((W W^T - I)^2), W the rows in use."""
        total = self.head.weight.new_zeros(())
        for t in (self.keys, self.attention, self.components):
            rows = self._pool(t, True)
            for i in range(rows.shape[1]):
                w = rows[:, i].reshape(rows.shape[0], -1)
                eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
                total = total + (w @ w.T - eye).square().mean()
        return total

    # -- training and evaluation ---------------------------------------------------------------------
    def forward(self, x: Tensor, task: Tensor | None = None, query: Tensor | None = None) -> MethodOutput:
        q = self.backbone.query(x) if query is None else query
        feat = self.backbone.forward_features(x, prefixes=self.prefixes(q), out_rows=1).tokens[:, 0]
        aux = None
        if self.training and self.params.ortho_mu > 0:
            aux = self.params.ortho_mu * self.ortho_penalty()
        return MethodOutput(self.head(feat), aux)

    # -- PGP ---------------------------------------------------------------------------------------
    def protected_groups(self, eps: dict[str, float]):
        # components=50: the PCA width DualPrompt's released arithmetic uses (pgp.mode=reference only).
        return self._keys().groups("prefix", eps["prefix"], components=50)

    def _keys(self) -> KeyPrefixBases:
        entries = [(f"prefix.l{layer}", self.components, pool_key_prefix_view(i), layer)
                   for i, layer in enumerate(self.params.layers)]
        bb = self.backbone
        return KeyPrefixBases(entries, self.params.key_basis == "head", bb.num_heads, bb.embed_dim)

    @torch.no_grad()
    def representations(self, x: Tensor, task: Tensor) -> dict[str, Tensor]:
        """Per prefixed layer, the queries W_q LN(x) (B, T, D) of the prompted forward that training
        runs (the prefixes assembled from this task's and the earlier components)."""
        layers = self.params.layers
        queries = self.backbone.queries(x, layers, prefixes=self.prefixes(self.backbone.query(x)))
        return self._keys().rows(queries)



def orthonormal_rows(old: Tensor, n: int) -> Tensor:
    """``n`` random unit rows (n, F), orthogonal to each other and to the span of ``old`` (k, F).

    Needs k + n <= F (the caller checks it). Draws from torch's global generator, so a seeded run is
    reproducible.
    """
    width = old.shape[1]
    draw = torch.randn(n, width, dtype=old.dtype, device=old.device)
    if old.shape[0]:
        basis = torch.linalg.qr(old.T).Q  # (F, k) orthonormal basis of span(old)
        draw = draw - (draw @ basis) @ basis.T
    return torch.linalg.qr(draw.T).Q.T  # (n, F): orthonormal rows spanning the projected draws
