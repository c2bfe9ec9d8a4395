"""L2P: Learning to Prompt (Wang et al., CVPR 2022), and L2P-PGP with ``pgp.enabled=true``.

A pool of M prompts (L tokens of width D each) with one key per prompt. The frozen ViT's final-norm
CLS feature of the un-prompted image is the query; the top-k keys by cosine similarity pick k prompts,
whose k*L tokens are inserted after the CLS token. Loss: cross-entropy over the current task's classes
minus ``pull_lambda`` times the mean cosine between the query and the selected keys.

PGP (design note, section 3): the selected prompts are protected with the span of the patch-embedding
tokens plus the prompt pool (eps 0.50); the keys with the span of the query features (eps 0.97). The
basis is built at the start of each task from that task's data, as released.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS
from pgpcl.methods.base import Method, MethodOutput, check_at_least
from pgpcl.methods.vit_common import PromptedViTMethod, init_head


@METHODS.register("l2p")
class L2P(PromptedViTMethod, Method):
    @dataclass
    class Params:
        pool_size: int = 10
        length: int = 5
        """Tokens per prompt."""
        top_k: int = 5
        batchwise_prompt: bool = True
        """Training: the k most frequent prompt ids of the batch are used for the whole batch."""
        test_batchwise: bool = False
        """Also vote at test time (released default; assumes one task per test batch, so off here)."""
        pull_lambda: float = 0.1
        head: Literal["prompt", "token"] = "prompt"
        """prompt: classifier on the mean of the prompt-position outputs; token: on the CLS output."""
        prompt_init: Literal["uniform", "zero", "normal"] = "uniform"
        pgp_basis: Literal["released", "v0.1"] = "released"
        """PGP only. 'released': task t is projected with tasks 0..t-1's basis (built at each task's start)
        and the pool joins the sum space from task 1 on, as the released code does. 'v0.1': pgpcl before
        2026-12-03, which also projected task t with the basis built from its own data and added the
        initial pool to task 0's; runs written then read as this, so they resume and report as they ran."""

        def validate(self) -> None:
            check_at_least(self, 1, "pool_size", "length", "top_k")
            check_at_least(self, 0, "pull_lambda")
            if self.top_k > self.pool_size:
                raise ConfigError(
                    f"method.top_k ({self.top_k}) is larger than method.pool_size ({self.pool_size}); "
                    "lower top_k or raise pool_size"
                )

    default_eps = {"prompt": 0.50, "key": 0.97}
    basis_timing = "task_start"
    ddp_find_unused_parameters = False  # prompt pools are whole tensors: always used

    def __init__(self, params: Params, backbone: nn.Module, num_classes: int, task_classes):
        super().__init__(params, num_classes, task_classes)
        from pgpcl.models import PromptPool

        self.backbone = backbone
        d = backbone.embed_dim
        self.pool = PromptPool(params.pool_size, (params.length, d), d, init=params.prompt_init)
        self.head = init_head(nn.Linear(d, num_classes))

    def whole_batch(self, x: Tensor, task: Tensor):
        """The batch-wise vote of a training step taken once, over the whole batch x (B, C, H, W)."""
        if not (self.training and self.params.batchwise_prompt):
            return contextlib.nullcontext()
        return self._vote_on_whole_batch(x, self.params.top_k)

    def _select(self, x: Tensor, query: Tensor | None = None):
        """Query the frozen ViT (unless ``query`` (B, D) is given) and pick prompts: idx (B, k), cosine (B, k)."""
        p = self.params
        batchwise = p.batchwise_prompt if self.training else p.test_batchwise
        q = self.backbone.query(x) if query is None else query
        if self._batch_ids is not None and self.training:  # a piece of a batch voted on as a whole
            return self.pool.select(q, p.top_k, force_idx=self._batch_ids.expand(q.shape[0], -1))
        return self.pool.select(q, p.top_k, batchwise=batchwise)

    def forward(self, x: Tensor, task: Tensor | None = None, query: Tensor | None = None) -> MethodOutput:
        sel = self._select(x, query)
        b, k = sel.idx.shape
        prompts = self.pool.gather(sel.idx).reshape(b, k * self.params.length, -1)
        r = self.backbone.num_prefix_tokens  # CLS (+ register tokens): the prompts follow them
        if self.params.head == "prompt":
            tokens = self.backbone.forward_features(x, prompts=prompts, out_rows=r + prompts.shape[1]).tokens
            feat = tokens[:, r:].mean(dim=1)
        else:
            feat = self.backbone.forward_features(x, prompts=prompts, out_rows=1).tokens[:, 0]
        aux = -self.params.pull_lambda * sel.key_sim.mean()
        return MethodOutput(self.head(feat), aux, {"prompt_idx": sel.idx})

    # -- PGP ---------------------------------------------------------------------------------------
    @property
    def extra_from_task(self) -> int:
        return 1 if self.params.pgp_basis == "released" else 0

    @property
    def own_task_basis_in_force(self) -> bool:
        return self.params.pgp_basis == "v0.1"

    def protected_groups(self, eps: dict[str, float]):
        from pgpcl.projection import ProtectedGroup

        return [
            # components: PCA widths of the released arithmetic (pgp.mode=reference only).
            ProtectedGroup("prompt", "prompt", self.pool.prompts, None, eps["prompt"], components=9),
            ProtectedGroup("key", "key", self.pool.keys, None, eps["key"], components=5),
        ]

    @torch.no_grad()
    def representations(self, x: Tensor, task: Tensor) -> dict[str, Tensor]:
        """prompt: patch-embedding tokens (B, N, D); key: query features (B, 1, D)."""
        patches, query = self.backbone.patch_tokens_and_query(x)
        return {"prompt": patches, "key": query.unsqueeze(1)}

    @torch.no_grad()
    def extra_representations(self) -> dict[str, Tensor]:
        """The prompt pool as rows (M*L, D): the prompt half of the sum space."""
        return {"prompt": self.pool.prompts.detach().reshape(-1, self.pool.prompts.shape[-1])}
