"""PromptPool selection and the DualPrompt prefix helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgpcl.errors import ConfigError
from pgpcl.models import PromptPool, batch_vote, join_layer_prefixes, prefix_split


def pool_with_keys(keys: torch.Tensor, prompt_shape=(2, 4)) -> PromptPool:
    pool = PromptPool(keys.shape[0], prompt_shape, keys.shape[1])
    with torch.no_grad():
        pool.keys.copy_(keys)
    return pool


def test_parameters_and_init():
    torch.manual_seed(0)
    pool = PromptPool(10, (5, 8), 8)
    assert pool.prompts.shape == (10, 5, 8) and pool.keys.shape == (10, 8)
    assert pool.prompts.min() >= -1 and pool.prompts.max() <= 1 and pool.prompts.abs().max() > 0.5
    assert PromptPool(3, (1, 2, 4, 8), 8, init="zero").prompts.abs().sum() == 0
    assert PromptPool(3, (4, 8), 8, init="normal").prompts.std() < 0.1
    with pytest.raises(ConfigError, match="unknown prompt init 'bogus'; choose from uniform, normal, zero"):
        PromptPool(3, (4, 8), 8, init="bogus")


def test_similarity_is_cosine():
    torch.manual_seed(1)
    pool = PromptPool(6, (2, 4), 4)
    q = torch.randn(3, 4)
    want = F.cosine_similarity(q[:, None], pool.keys[None], dim=-1)
    assert torch.allclose(pool.similarity(q), want, atol=1e-6)


def test_topk_picks_highest_cosine_keys():
    torch.manual_seed(2)
    pool = PromptPool(8, (2, 4), 16)
    q = torch.randn(5, 16)
    sel = pool.select(q, top_k=3)
    sim = F.cosine_similarity(q[:, None], pool.keys[None], dim=-1)
    assert sel.idx.shape == (5, 3) and sel.idx.dtype == torch.long
    for b in range(5):
        assert set(sel.idx[b].tolist()) == set(sim[b].argsort(descending=True)[:3].tolist())
    assert torch.allclose(sel.key_sim, sim.gather(1, sel.idx), atol=1e-6)
    # Scaling keys does not change cosine selection.
    with torch.no_grad():
        pool.keys.mul_(torch.rand(8, 1) * 10 + 0.1)
    assert torch.equal(pool.select(q, top_k=3).idx, sel.idx)


def test_batchwise_picks_most_frequent_with_low_id_ties():
    keys = torch.eye(5)
    pool = pool_with_keys(keys)
    # Queries aimed at keys: sample top-2 sets {0,3}, {3,1}, {3,0}, {4,1} -> counts 0:2, 1:2, 3:3, 4:1.
    q = torch.stack(
        [keys[0] + 0.5 * keys[3], keys[3] + 0.5 * keys[1], keys[3] + 0.5 * keys[0], keys[4] + 0.5 * keys[1]]
    )
    sel = pool.select(q, top_k=2, batchwise=True)
    assert sel.idx.tolist() == [[3, 0]] * 4  # 3 most frequent; 0 beats 1 on the tie
    assert sel.sim.shape == (4, 5)
    assert torch.allclose(sel.key_sim, sel.sim[:, [3, 0]])


def test_batch_vote_fills_with_mean_similarity():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.8], [0.7, 0.2, 0.6, 0.1]])
    idx = torch.tensor([[0], [0]])  # only one distinct id voted
    assert batch_vote(idx, sim, 3).tolist() == [[0, 2, 3]]  # then mean sims 0.55 (id 2), 0.45 (id 3)


def test_force_idx_overrides_selection_and_keeps_key_sim():
    torch.manual_seed(3)
    pool = PromptPool(6, (2, 4), 8)
    q = torch.randn(4, 8)
    forced = torch.tensor([5, 0, 2, 2])
    sel = pool.select(q, top_k=1, force_idx=forced)
    assert sel.idx.tolist() == [[5], [0], [2], [2]]
    assert torch.allclose(sel.key_sim, pool.similarity(q).gather(1, forced[:, None]))
    sel2 = pool.select(q, top_k=2, force_idx=torch.tensor([[1, 4]] * 4))
    assert sel2.idx.tolist() == [[1, 4]] * 4
    # key_sim stays differentiable w.r.t. the keys: the pull constraint trains them.
    sel.key_sim.sum().backward()
    assert (
        pool.keys.grad is not None
        and pool.keys.grad[5].abs().sum() > 0
        and pool.keys.grad[3].abs().sum() == 0
    )
    with pytest.raises(ValueError):
        pool.select(q, top_k=1, force_idx=torch.tensor([6, 0, 0, 0]))


def test_gather_shapes_and_grad():
    pool = PromptPool(5, (3, 2, 4, 8), 8)
    idx = torch.tensor([[1, 3], [0, 1]])
    g = pool.gather(idx)
    assert g.shape == (2, 2, 3, 2, 4, 8)
    assert torch.equal(g[0, 1], pool.prompts[3])
    g.sum().backward()
    assert pool.prompts.grad[1].eq(2).all() and pool.prompts.grad[2].eq(0).all()


def released_buggy_split(p_bn2ld: torch.Tensor):
    """The released DualPrompt layout (layers, 2, B, L, D) reshaped to (layers, B, 2, L, D) WITHOUT a
    permute, then split on the '2' axis: kept here to prove the test below catches it."""
    n, two, B, L, D = p_bn2ld.shape
    wrong = p_bn2ld.reshape(n, B, two, L, D)
    return wrong[:, :, 0], wrong[:, :, 1]  # (n, B, L, D) each


def test_prefix_split_keeps_keys_and_values_apart_per_sample():
    B, n, L, D = 4, 3, 2, 5
    # Key slots hold +(b+1), value slots hold -(b+1): any mixing is visible per sample.
    sign = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1, 1)
    marks = torch.arange(1, B + 1, dtype=torch.float).view(B, 1, 1, 1, 1)
    p = (sign * marks).expand(B, n, 2, L, D).clone()
    k, v = prefix_split(p)
    assert k.shape == v.shape == (B, n, L, D)
    prefixes = join_layer_prefixes(p, [2, 3, 4])
    assert sorted(prefixes) == [2, 3, 4]
    for layer in (2, 3, 4):
        kp, vp = prefixes[layer]
        assert kp.shape == vp.shape == (B, L, D)
        for b in range(B):
            assert torch.all(kp[b] == b + 1) and torch.all(vp[b] == -(b + 1))
    # The same check fails on the released reshape: samples get two keys or two values.
    bk, bv = released_buggy_split(p.permute(1, 2, 0, 3, 4))
    ok = all(torch.all(bk[0, b] == b + 1) and torch.all(bv[0, b] == -(b + 1)) for b in range(B))
    assert not ok


def test_join_layer_prefixes_concatenates_topk_along_length():
    B, k, n, L, D = 2, 3, 2, 4, 6
    p = torch.randn(B, k, n, 2, L, D)
    out = join_layer_prefixes(p, [0, 1])
    kp, vp = out[1]
    assert kp.shape == (B, k * L, D)
    for j in range(k):
        assert torch.equal(kp[:, j * L : (j + 1) * L], p[:, j, 1, 0])
        assert torch.equal(vp[:, j * L : (j + 1) * L], p[:, j, 1, 1])
    with pytest.raises(ValueError):
        join_layer_prefixes(torch.randn(B, n, 2, L, D), [0])
    with pytest.raises(ValueError):
        prefix_split(torch.randn(B, 3, L, D))
