"""Straightforward reference implementations the benchmarks compare pgpcl against.

Written here, in the style of the released L2P / DualPrompt / PGP code, on purpose without pgpcl's
fast paths:

- two full ViTs: a ``copy.deepcopy`` of the backbone is the query encoder ("original_model");
- eager fp32 attention everywhere: ``softmax(q k^T * scale) v`` with the (B, H, T, S) attention matrix
  materialised (timm's ``attn.fused_attn = False`` for the un-prefixed blocks);
- PGP: a dense projection matrix ``P = U U^T`` (D, D) per group and ``g <- g - g P``;
- basis building one image at a time through the model (``batch=1``; the released code feeds
  batches of 24 through the model after loading 768 images one by one), rows stacked, then an SVD
  of the stacked representation matrix.

They compute the same functions as pgpcl's paths (checked by ``check_equivalence``), so timing and
memory differences come from the implementation only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import set_timm_fused


def eager_attention(attn: nn.Module, x: Tensor, prefix: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Explicit softmax(q k^T) v; prefix = (key_prefix, value_prefix) each (B, L, D) joined to k, v."""
    B, N, C = x.shape
    H = attn.num_heads
    hd = C // H
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    if prefix is not None:
        kp, vp = (p.reshape(B, p.shape[1], H, hd).permute(0, 2, 1, 3) for p in prefix)
        k, v = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
    w = (q @ k.transpose(-2, -1)) * attn.scale
    w = w.softmax(dim=-1)
    out = (w @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out)


def eager_block(blk: nn.Module, x: Tensor, prefix=None) -> Tensor:
    x = x + eager_attention(blk.attn, blk.norm1(x), prefix)
    return x + blk.mlp(blk.norm2(x))


def _embed(vit: nn.Module, x: Tensor, prompts: Tensor | None = None) -> Tensor:
    h = vit._pos_embed(vit.patch_embed(x))  # CLS + pos
    if prompts is not None:
        h = torch.cat([h[:, :1], prompts + vit.pos_embed[:, :1], h[:, 1:]], dim=1)
    return h


class _TwoViTs(nn.Module):
    """What the released code does: a deep copy of the backbone as the query encoder (two full ViTs in
    memory), both frozen and in eval mode, eager attention everywhere."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.original_model = copy.deepcopy(vit)
        self.vit = vit
        for m in (self.original_model, self.vit):
            set_timm_fused(m, False)
            m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.original_model.eval()
        self.vit.eval()
        return self


class RefL2P(_TwoViTs):
    """L2P as released: a separate query ViT, prompts after CLS, eager attention."""

    def __init__(self, vit: nn.Module, num_classes: int, pool_size=10, length=5, top_k=5, pull_lambda=0.1):
        super().__init__(vit)
        d = vit.embed_dim
        self.top_k, self.length, self.pull_lambda = top_k, length, pull_lambda
        self.prompt = nn.Parameter(torch.empty(pool_size, length, d).uniform_(-1, 1))
        self.prompt_key = nn.Parameter(torch.empty(pool_size, d).uniform_(-1, 1))
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: Tensor, task: Tensor | None = None):
        with torch.no_grad():
            q = self.original_model.forward_features(x)[:, 0]
        qn, kn = F.normalize(q, dim=-1), F.normalize(self.prompt_key, dim=-1)
        sim = qn @ kn.t()
        idx = sim.topk(self.top_k, dim=1).indices
        if self.training:  # batch-wise selection: the k most frequent ids
            ids, counts = torch.unique(idx, return_counts=True, sorted=True)
            if ids.numel() < self.top_k:
                ids = torch.cat([ids, sim.mean(0).topk(self.top_k).indices])[: self.top_k]
                counts = torch.ones_like(ids)
            idx = ids[counts.topk(self.top_k).indices].unsqueeze(0).expand(x.shape[0], -1)
        b = x.shape[0]
        prompts = self.prompt[idx].reshape(b, self.top_k * self.length, -1)
        h = _embed(self.vit, x, prompts)
        for blk in self.vit.blocks:
            h = eager_block(blk, h)
        h = self.vit.norm(h)
        logits = self.head(h[:, 1 : 1 + prompts.shape[1]].mean(dim=1))
        reduce_sim = (kn[idx] * qn.unsqueeze(1)).sum() / b
        return logits, -self.pull_lambda * reduce_sim / self.top_k, idx

    # PGP, as released: dense P = U U^T, g[selected] <- g[selected] - g[selected] P
    def project(self, mats: dict[str, Tensor], idx: Tensor) -> None:
        sel = idx[0]
        for name, p in (("prompt", self.prompt), ("key", self.prompt_key)):
            g = p.grad
            g[sel] = g[sel] - torch.matmul(g[sel], mats[name])

    @torch.no_grad()
    def representations(self, x: Tensor) -> dict[str, Tensor]:
        """prompt: patch-embedding tokens (B, N, D) (through the prompted model); key: query (B, 1, D)."""
        return {
            "prompt": self.vit.patch_embed(x),
            "key": self.original_model.forward_features(x)[:, :1],
        }


class RefDualPrompt(_TwoViTs):
    """DualPrompt as released (without its key/value mixing defect): separate query ViT, eager attention."""

    def __init__(
        self,
        vit: nn.Module,
        num_classes: int,
        pool_size=10,
        g_layers=(0, 1),
        e_layers=(2, 3, 4),
        g_length=5,
        e_length=5,
        pull_lambda=1.0,
    ):
        super().__init__(vit)
        d = vit.embed_dim
        self.g_layers, self.e_layers, self.pull_lambda = list(g_layers), list(e_layers), pull_lambda
        self.g_prompt = nn.Parameter(torch.empty(len(g_layers), 2, g_length, d).uniform_(-1, 1))
        self.e_prompt = nn.Parameter(torch.empty(pool_size, len(e_layers), 2, e_length, d).uniform_(-1, 1))
        self.e_key = nn.Parameter(torch.empty(pool_size, d).uniform_(-1, 1))
        self.head = nn.Linear(d, num_classes)

    def _prefixes(self, x: Tensor, task: Tensor | None):
        with torch.no_grad():
            q = self.original_model.forward_features(x)[:, 0]
        qn, kn = F.normalize(q, dim=-1), F.normalize(self.e_key, dim=-1)
        sim = qn @ kn.t()
        idx = task.view(-1, 1) if task is not None else sim.topk(1, dim=1).indices
        b = x.shape[0]
        e = self.e_prompt[idx[:, 0]]  # (B, n_e, 2, L, D)
        prefixes = {}
        for i, layer in enumerate(self.g_layers):
            g = self.g_prompt[i].unsqueeze(0).expand(b, -1, -1, -1)
            prefixes[layer] = (g[:, 0], g[:, 1])
        for i, layer in enumerate(self.e_layers):
            prefixes[layer] = (e[:, i, 0], e[:, i, 1])
        reduce_sim = (kn[idx] * qn.unsqueeze(1)).sum() / b
        return prefixes, reduce_sim, idx

    def forward(self, x: Tensor, task: Tensor | None = None):
        prefixes, reduce_sim, idx = self._prefixes(x, task)
        h = _embed(self.vit, x)
        for i, blk in enumerate(self.vit.blocks):
            h = eager_block(blk, h, prefixes.get(i))
        h = self.vit.norm(h)
        return self.head(h[:, 0]), -self.pull_lambda * reduce_sim, idx

    def project(self, mats: dict[str, Tensor], idx: Tensor) -> None:
        """Key-prefixes of every prefixed layer: g <- g - g P_layer."""
        for i, layer in enumerate(self.g_layers):
            g = self.g_prompt.grad[i, 0]
            g.sub_(g @ mats[f"g_key.l{layer}"])
        for i, layer in enumerate(self.e_layers):
            g = self.e_prompt.grad[:, i, 0]
            g.sub_(torch.matmul(g, mats[f"e_key.l{layer}"]))

    @torch.no_grad()
    def representations(self, x: Tensor, task: Tensor) -> dict[str, Tensor]:
        """Queries W_q LN(x) at each prefixed layer of the prompted forward, (B, T, D)."""
        prefixes, _, _ = self._prefixes(x, task)
        h = _embed(self.vit, x)
        out = {}
        for i, blk in enumerate(self.vit.blocks):
            if i in prefixes:
                a = blk.attn
                q = F.linear(blk.norm1(h), a.qkv.weight[: a.qkv.in_features], a.qkv.bias[: a.qkv.in_features])
                name = f"g_key.l{i}" if i in self.g_layers else f"e_key.l{i}"
                out[name] = q
            h = eager_block(blk, h, prefixes.get(i))  # the whole model runs, as released
        return out


def build_reference(method: str, vit: nn.Module, num_classes: int) -> nn.Module:
    return RefL2P(vit, num_classes) if method == "l2p" else RefDualPrompt(vit, num_classes)


def copy_trainables(ref: nn.Module, pgpcl_method: nn.Module) -> None:
    """Give the reference the same prompts / keys / head as the pgpcl method (for equivalence checks)."""
    with torch.no_grad():
        if isinstance(ref, RefL2P):
            ref.prompt.copy_(pgpcl_method.pool.prompts)
            ref.prompt_key.copy_(pgpcl_method.pool.keys)
        else:
            ref.g_prompt.copy_(pgpcl_method.g_prompt)
            ref.e_prompt.copy_(pgpcl_method.pool.prompts)
            ref.e_key.copy_(pgpcl_method.pool.keys)
        ref.head.load_state_dict(pgpcl_method.head.state_dict())


@torch.no_grad()
def check_equivalence(ref: nn.Module, method: nn.Module, x: Tensor, task: Tensor) -> float:
    """Max |logits_ref - logits_pgpcl| in eval mode with the same trainables (should be ~1e-5)."""
    copy_trainables(ref, method)
    ref.eval()
    method.eval()
    a = ref(x, task if isinstance(ref, RefDualPrompt) else None)[0]
    b = method(x, task if isinstance(ref, RefDualPrompt) else None).logits
    return float((a - b).abs().max())


def dense_projections(bases: dict[str, Tensor], device, dtype=torch.float32) -> dict[str, Tensor]:
    """As released: P = U U^T per group, a dense (D, D) matrix on the device."""
    return {k: (u @ u.T).to(device, dtype) for k, u in bases.items()}


# ----------------------------------------------------------------------------------------------------
# Basis building, one image at a time, then an SVD of the stacked rows


@torch.no_grad()
def build_basis_per_sample(ref: nn.Module, images: Tensor, tasks: Tensor, eps: dict[str, float],
                           extra: dict[str, Tensor] | None = None, batch: int = 1) -> dict[str, Tensor]:
    """Representations ``batch`` images at a time (1 = per sample), stacked rows, SVD, keep eps energy.

    Feature-space geometry (rows in R^D), same as pgpcl's default ``feature`` mode, so the work is
    comparable: first-task basis = top right-singular vectors of R whose sigma^2 reach eps.
    """
    ref.eval()
    rows: dict[str, list[Tensor]] = {}
    for start in range(0, images.shape[0], batch):
        x = images[start : start + batch]
        if isinstance(ref, RefDualPrompt):
            reps = ref.representations(x, tasks[start : start + batch])
        else:
            reps = ref.representations(x)
        for k, v in reps.items():
            rows.setdefault(k, []).append(v.reshape(-1, v.shape[-1]).cpu())
    bases = {}
    for k, chunks in rows.items():
        r = torch.cat(chunks).double()
        if extra and k in extra:  # sum space: the prompt rows, scaled to the same total energy
            p = extra[k].double().cpu()
            r = torch.cat([r / r.norm(), p / p.norm()])
        _, s, vh = torch.linalg.svd(r, full_matrices=False)
        ratio = torch.cumsum(s.square(), 0) / s.square().sum()
        keep = int((ratio < eps[k]).sum()) + 1  # eps per group name
        bases[k] = vh[:keep].T.contiguous()
    return bases
