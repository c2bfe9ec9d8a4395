"""PromptedViT: prompted / prefixed forward against hand-written references on tiny ViTs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from pgpcl.errors import ConfigError
from pgpcl.models import FeatureOutput, PromptedViT

D, H, DEPTH, IMG, PATCH = 32, 4, 3, 16, 8  # N = 4 patches
N = (IMG // PATCH) ** 2


@pytest.fixture(autouse=True, scope="module")
def _threads(module_one_thread):
    yield


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    """A random tiny ViT whose every parameter is perturbed, so LN/cls/pos are all non-trivial."""
    torch.manual_seed(seed)
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=H, num_classes=0)
    vit = VisionTransformer(**{**args, **kw})
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vit.eval()


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def ln(m: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def ref_block(blk, x, kp=None, vp=None):
    """Hand-written pre-norm block; keys/values are [prefix; tokens], heads done one by one."""
    h = ln(blk.norm1, x)
    w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
    q, k, v = (h @ w[i * D : (i + 1) * D].t() + b[i * D : (i + 1) * D] for i in range(3))
    if kp is not None:
        k, v = torch.cat([kp, k], 1), torch.cat([vp, v], 1)
    hd = D // H
    heads = []
    for j in range(H):
        s = slice(j * hd, (j + 1) * hd)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / hd**0.5, dim=-1)
        heads.append(a @ v[..., s])
    x = x + blk.attn.proj(torch.cat(heads, -1))
    m = blk.mlp
    return x + m.fc2(F.gelu(m.fc1(ln(blk.norm2, x))))


def embedded(vit, x, prompts=None):
    """Manual embedding: [CLS+pos0, prompts+pos0, patches+pos]."""
    pos = vit.pos_embed
    patches = vit.patch_embed(x) + pos[:, 1:]
    cls = (vit.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
    parts = [cls] + ([prompts + pos[:, :1]] if prompts is not None else []) + [patches]
    return torch.cat(parts, 1)


def test_shapes_and_properties():
    pv = PromptedViT(tiny_vit())
    assert (pv.embed_dim, pv.depth, pv.num_heads, pv.num_patches, pv.num_prefix_tokens) == (D, DEPTH, H, N, 1)
    x = images()
    assert pv.patch_tokens(x).shape == (2, N, D)
    assert pv.embed(x).shape == (2, 1 + N, D)
    out = pv.forward_features(
        x, prompts=torch.randn(2, 5, D), prefixes={1: (torch.randn(2, 3, D),) * 2}, capture_queries=(0, 2)
    )
    assert isinstance(out, FeatureOutput)
    assert out.tokens.shape == (2, 1 + 5 + N, D) and out.cls.shape == (2, D)
    assert sorted(out.queries) == [0, 2] and out.queries[0].shape == (2, 1 + 5 + N, D)


def test_prompts_get_cls_position_embedding():
    vit = tiny_vit()
    pv = PromptedViT(vit)
    x, p = images(), torch.randn(2, 3, D)
    seq = embedded(vit, x, p)
    with torch.no_grad():
        assert torch.allclose(pv._sequence(x, p), seq, atol=1e-6)
        want = vit.norm(vit.blocks(seq))
        got = pv.forward_features(x, prompts=p).tokens
    assert torch.allclose(got, want, atol=1e-5)


def test_shared_prompt_batch_of_one_broadcasts():
    pv = PromptedViT(tiny_vit())
    x, p = images(3), torch.randn(1, 2, D)
    with torch.no_grad():
        a = pv.forward_features(x, prompts=p).tokens
        b = pv.forward_features(x, prompts=p.expand(3, -1, -1)).tokens
    assert torch.equal(a, b)


def test_embed_and_patch_tokens_match_timm():
    vit = tiny_vit()
    pv = PromptedViT(vit)
    x = images()
    with torch.no_grad():
        assert torch.equal(pv.patch_tokens(x), vit.patch_embed(x))
        assert torch.allclose(pv.embed(x), embedded(vit, x), atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_block_matches_hand_written_attention(fused):
    vit = tiny_vit()
    pv = PromptedViT(vit, fused_attention=fused)
    torch.manual_seed(3)
    x, kp, vp = torch.randn(2, 1 + N, D), torch.randn(2, 4, D), torch.randn(2, 4, D)
    blk = vit.blocks[1]
    with torch.no_grad():
        got = pv._block(blk, x, (kp, vp), capture=False)[0]
        want = ref_block(blk, x, kp, vp)
        assert torch.allclose(got, want, atol=1e-5)
        # The path that also returns the prefix weights (Prefix-PGP's pass) computes the same block.
        with_weights, _, weights = pv._block(blk, x, (kp, vp), capture=True, prefix_weights=True)
        assert torch.allclose(with_weights, want, atol=1e-5) and weights.shape == (2, blk.attn.num_heads, 1 + N, 4)
        # Whole forward with a prefix at layer 1 only.
        seq = embedded(vit, images())
        want_all = vit.norm(vit.blocks[2](ref_block(blk, vit.blocks[0](seq), kp, vp)))
        got_all = pv.forward_features(images(), prefixes={1: (kp, vp)}).tokens
    assert torch.allclose(got_all, want_all, atol=1e-5)


def test_prefix_keys_and_values_are_not_swapped():
    vit = tiny_vit()
    pv = PromptedViT(vit)
    torch.manual_seed(4)
    x, kp, vp = torch.randn(2, 1 + N, D), torch.randn(2, 4, D), torch.randn(2, 4, D)
    with torch.no_grad():
        good = pv._block(vit.blocks[0], x, (kp, vp), False)[0]
        swapped = pv._block(vit.blocks[0], x, (vp, kp), False)[0]
    assert torch.allclose(good, ref_block(vit.blocks[0], x, kp, vp), atol=1e-5)
    assert not torch.allclose(good, swapped, atol=1e-3)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "init_values": 0.5}, {"pre_norm": True}])
def test_empty_prompts_and_prefixes_equal_timm(fused, kw):
    vit = tiny_vit(**kw)
    pv = PromptedViT(vit, fused_attention=fused)
    x = images()
    empty = {i: (torch.zeros(2, 0, D), torch.zeros(2, 0, D)) for i in range(DEPTH)}
    with torch.no_grad():
        want = vit.forward_features(x)
        assert torch.allclose(pv.forward_features(x).tokens, want, atol=1e-6)
        got = pv.forward_features(
            x, prompts=torch.zeros(2, 0, D), prefixes=empty, capture_queries=range(DEPTH)
        )
    assert torch.allclose(got.tokens, want, atol=1e-5)


def test_capture_queries_equal_wq_ln_x():
    vit = tiny_vit()
    pv = PromptedViT(vit)
    x, p = images(), torch.randn(2, 2, D)
    with torch.no_grad():
        out = pv.forward_features(x, prompts=p, capture_queries=[0, 2])
        h = embedded(vit, x, p)
        for i, blk in enumerate(vit.blocks):
            if i in (0, 2):
                wq, bq = blk.attn.qkv.weight[:D], blk.attn.qkv.bias[:D]
                assert torch.allclose(out.queries[i], ln(blk.norm1, h) @ wq.t() + bq, atol=1e-5)
            h = blk(h)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"qkv_bias": False}])
@pytest.mark.parametrize("layers", [[0], [1, 2], [2, 0]])
def test_queries_only_equal_captured_queries(kw, layers):
    """The early-stopping query pass gives forward_features' captured queries, prompts or prefixes."""
    vit = tiny_vit(**kw)
    pv = PromptedViT(vit)
    x = images()
    prefixes = {0: (torch.randn(2, 3, D), torch.randn(2, 3, D)), 2: (torch.randn(2, 3, D), torch.randn(2, 3, D))}
    with torch.no_grad():
        for inputs in ({"prompts": torch.randn(2, 4, D)}, {"prefixes": prefixes}, {}):
            want = pv.forward_features(x, capture_queries=layers, **inputs).queries
            got = pv.queries(x, layers, **inputs)
            assert sorted(got) == sorted(want)
            for layer in want:
                assert got[layer].shape == want[layer].shape
                assert torch.allclose(got[layer], want[layer], atol=1e-5)
    assert pv.queries(x, []) == {}
    with pytest.raises(ValueError):
        pv.queries(x, [DEPTH])


def test_queries_only_skips_later_blocks():
    vit = tiny_vit()
    pv = PromptedViT(vit)
    calls = []
    for i, blk in enumerate(vit.blocks):
        blk.mlp.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        pv.queries(images(), [1])
    assert calls == [0]  # block 1 computes its queries only; block 2 never runs


@pytest.mark.parametrize(
    "kw",
    [{}, {"qk_norm": True, "init_values": 0.5}, {"reg_tokens": 2, "no_embed_class": True},
     {"qkv_bias": False}, {"pre_norm": True}],
)
@pytest.mark.parametrize("fused", [True, False])
def test_query_cls_only_last_block_matches_timm(kw, fused):
    """query() runs the last block for the CLS row only; the result is timm's CLS feature."""
    vit = tiny_vit(**kw)
    pv = PromptedViT(vit, fused_attention=fused)
    x = images(3)
    with torch.no_grad():
        want = vit.forward_features(x)[:, 0]
    assert torch.allclose(pv.query(x), want, atol=1e-5)


def test_patch_tokens_and_query_from_one_embedding_equal_the_separate_calls():
    pv = PromptedViT(tiny_vit(reg_tokens=1))
    x = images(3)
    with torch.no_grad():
        patches, query = pv.patch_tokens_and_query(x)
        assert torch.equal(patches, pv.patch_tokens(x))
        assert torch.allclose(query, pv.query(x), atol=1e-6)


def test_query_is_timm_cls_feature_and_shares_weights():
    vit = tiny_vit()
    pv = PromptedViT(vit)
    x = images().requires_grad_(True)
    q = pv.query(x)
    assert not q.requires_grad
    with torch.no_grad():
        assert torch.allclose(q, vit.forward_features(x)[:, 0], atol=1e-6)
    # One copy of the weights: every parameter of the wrapper is a parameter of the timm model.
    assert {p.data_ptr() for p in pv.parameters()} == {p.data_ptr() for p in vit.parameters()}
    assert sum(p.numel() for p in pv.parameters()) == sum(p.numel() for p in vit.parameters())
    with torch.no_grad():
        vit.norm.bias.add_(1.0)
    assert torch.allclose(pv.query(x), q + 1.0, atol=1e-5)


def test_backbone_frozen_through_optimizer_step():
    vit = tiny_vit(drop_path_rate=0.5, proj_drop_rate=0.5, attn_drop_rate=0.5)
    pv = PromptedViT(vit)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    prompt = torch.nn.Parameter(torch.randn(1, 3, D))
    kp = torch.nn.Parameter(torch.randn(2, 2, D))
    vp = torch.nn.Parameter(torch.randn(2, 2, D))
    opt = torch.optim.SGD([prompt, kp, vp, *pv.parameters()], lr=0.1, momentum=0.9, weight_decay=0.1)
    pv.train()
    assert pv.training and not vit.training and not any(m.training for m in vit.modules())
    p0 = prompt.detach().clone()
    loss = pv.forward_features(images(), prompts=prompt, prefixes={1: (kp, vp)}).tokens.pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in vit.parameters())
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (prompt, kp, vp))
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert not torch.equal(prompt.detach(), p0)


def test_train_mode_is_deterministic_with_dropout():
    pv = PromptedViT(tiny_vit(drop_path_rate=0.5, proj_drop_rate=0.5, pos_drop_rate=0.5)).train()
    assert pv.training and not any(m.training for m in pv.vit.modules())
    pv.vit.train()  # someone switched the backbone on: the next switch turns it off again
    pv.train()
    assert not any(m.training for m in pv.vit.modules())
    x, p = images(), torch.randn(2, 2, D)
    with torch.no_grad():
        a = pv.forward_features(x, prompts=p, prefixes={0: (p, p)}).tokens
        b = pv.forward_features(x, prompts=p, prefixes={0: (p, p)}).tokens
    assert torch.equal(a, b)


def test_register_tokens_and_no_embed_class():
    vit = tiny_vit(reg_tokens=2, no_embed_class=True)
    pv = PromptedViT(vit)
    assert pv.num_prefix_tokens == 3
    x, p = images(), torch.randn(2, 2, D)
    with torch.no_grad():
        assert torch.allclose(pv.forward_features(x).tokens, vit.forward_features(x), atol=1e-6)
        seq = pv._sequence(x, p)
        base = pv.embed(x)
    assert seq.shape == (2, 3 + 2 + N, D)
    # [CLS, regs] kept in front; prompts carry no position (CLS has none either); patches follow.
    assert torch.allclose(seq[:, :3], base[:, :3]) and torch.allclose(seq[:, 5:], base[:, 3:])
    assert torch.allclose(seq[:, 3:5], p)


def test_rejects_vit_without_class_token():
    vit = VisionTransformer(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=D,
        depth=1,
        num_heads=H,
        num_classes=0,
        class_token=False,
        global_pool="avg",
    )
    with pytest.raises(ConfigError, match="class token"):
        PromptedViT(vit)


def test_bad_inputs_raise():
    pv = PromptedViT(tiny_vit())
    x = images()
    with pytest.raises(ValueError, match="out of range"):
        pv.forward_features(x, capture_queries=[DEPTH])
    with pytest.raises(ValueError, match="prompts"):
        pv.forward_features(x, prompts=torch.randn(3, 2, D))
    with pytest.raises(ValueError, match="key_prefix"):
        pv.forward_features(x, prefixes={0: (torch.randn(2, 2, D + 1), torch.randn(2, 2, D))})


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}])
def test_out_rows_equal_the_first_rows_of_the_full_forward_and_their_gradients(kw):
    """out_rows=k computes the last block for k rows only: same tokens and same prompt gradients as
    slicing the full forward; a prefix at the last layer falls back to the full block."""
    pv = PromptedViT(tiny_vit(**kw))
    x = images(3)
    r = pv.num_prefix_tokens
    for prefix_layers in ([], [0], [DEPTH - 1]):
        prompts = torch.randn(3, 2, D, requires_grad=True)
        prefixes = {layer: (torch.randn(3, 2, D), torch.randn(3, 2, D)) for layer in prefix_layers}
        grads, outs = [], []
        for rows in (None, r + 2):
            out = pv.forward_features(x, prompts=prompts, prefixes=prefixes, out_rows=rows).tokens[:, : r + 2]
            (g,) = torch.autograd.grad(out.square().sum(), prompts)
            outs.append(out.detach())
            grads.append(g)
        assert outs[1].shape == (3, r + 2, D)
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="out_rows"):
        pv.forward_features(x, out_rows=0)


def _count_sdpa(monkeypatch) -> list[int]:
    """Count F.scaled_dot_product_attention calls (timm's blocks and PromptedViT's look it up on F)."""
    calls: list[int] = []
    real = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    return calls


def test_cpu_bf16_uses_the_plain_attention_product_and_fp32_the_fused_one(monkeypatch):
    calls = _count_sdpa(monkeypatch)
    pv = PromptedViT(tiny_vit(), fused_attention=True)
    eager = PromptedViT(tiny_vit(), fused_attention=False)
    x, prompts = images(), torch.randn(2, 3, D)
    prefixes = {1: (torch.randn(2, 4, D), torch.randn(2, 4, D))}
    with torch.no_grad():
        want = eager.forward_features(x, prompts=prompts, prefixes=prefixes).tokens
        assert calls == [], "fused_attention=False must reach timm's own blocks too"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = pv.forward_features(x, prompts=prompts, prefixes=prefixes).tokens
            low_query = pv.query(x)
        assert calls == []
        got = pv.forward_features(x, prompts=prompts, prefixes=prefixes).tokens  # fp32 again: fused
        assert len(calls) == DEPTH
        assert torch.allclose(pv.query(x), low_query.float(), atol=0.1)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(low.float(), want, atol=0.1)  # bf16 rounding only
    with torch.no_grad():  # a model cast to bf16 (no autocast) takes the plain product as well
        calls.clear()
        PromptedViT(tiny_vit().to(torch.bfloat16)).forward_features(x.to(torch.bfloat16), prompts=prompts.bfloat16())
    assert calls == []
