"""LoRA on CLIP's image tower and CLIP-LoRA-PGP on the small random open_clip model: the wrapped
attention computes open_clip's attention, what trains, old images' features under PGP with the frozen
CLIP weights untouched, resume, bad input, the CLI and the report."""

from __future__ import annotations

import pytest
import torch

from pgpcl.errors import ConfigError
from pgpcl.models.lora import CLIPSelfAttention, LoRAAttention, LoRALinear, add_clip_lora
from test_clip import small_clip
from test_clip_adapter import _trainer, old_image_features_change, paired_cli_runs
from test_resume import assert_killed_mid_task_resumes_exactly

pytestmark = pytest.mark.usefixtures("data_one_thread")
KINDS = ("lora_a", "lora_b")


def test_wrapped_attention_is_open_clips_until_its_factors_move():
    model, _ = small_clip()
    visual = model.visual
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        before = visual(x)
        added = add_clip_lora(visual.transformer.resblocks, [0], ["qkv", "fc2"], rank=2, alpha=2.0)
        torch.testing.assert_close(visual(x), before, atol=1e-6, rtol=1e-5)  # B = 0
        attn = added["b0.qkv"]
        attn.lora_b.normal_()
        h = torch.randn(3, 5, 32)
        a = attn.attn
        qkv = h @ (a.in_proj_weight + attn.scale * attn.lora_b @ attn.lora_a).T + a.in_proj_bias
        q, k, v = qkv.reshape(3, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
        expected = a.out_proj(torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1).matmul(v).transpose(1, 2).reshape(3, 5, 32))
        torch.testing.assert_close(attn(h, h, h)[0], expected, atol=1e-5, rtol=1e-4)
    assert isinstance(visual.transformer.resblocks[0].attn, LoRAAttention)
    assert isinstance(visual.transformer.resblocks[0].mlp.c_proj, LoRALinear)
    with pytest.raises(ValueError, match="has LoRA already"):
        add_clip_lora(visual.transformer.resblocks, [0], ["qkv"], 2, 2.0)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(h, h.clone(), h)


def test_lora_on_the_output_projection_is_not_bypassed():
    """torch's attention function reads out_proj.weight itself; CLIPSelfAttention calls it as a module,
    so the factors count, alone and beside a qkv LoRA added later."""
    model, _ = small_clip()
    visual = model.visual
    blocks = visual.transformer.resblocks
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        before = visual(x)
        proj = add_clip_lora(blocks, [0], ["proj"], rank=2, alpha=2.0)["b0.proj"]
        assert type(blocks[0].attn) is CLIPSelfAttention and blocks[0].attn.attn.out_proj is proj
        torch.testing.assert_close(visual(x), before, atol=1e-6, rtol=1e-5)  # B = 0
        proj.lora_b.normal_()
        h = torch.randn(3, 5, 32)
        a = blocks[0].attn.attn
        q, k, v = (h @ a.in_proj_weight.T + a.in_proj_bias).reshape(3, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
        o = torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1).matmul(v).transpose(1, 2).reshape(3, 5, 32)
        expected = o @ (proj.base.weight + proj.scale * proj.lora_b @ proj.lora_a).T + proj.base.bias
        proj.capture = True
        torch.testing.assert_close(blocks[0].attn(h, h, h)[0], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(proj.captured, o, atol=1e-5, rtol=1e-4)  # PGP's rows: out_proj's inputs
        proj.capture, proj.captured = False, None
        moved = visual(x)
        assert (moved - before).abs().max() > 1e-4
        add_clip_lora(blocks, [0], ["qkv"], rank=2, alpha=2.0)
        assert isinstance(blocks[0].attn, LoRAAttention) and blocks[0].attn.attn.out_proj is proj
        torch.testing.assert_close(visual(x), moved, atol=1e-6, rtol=1e-5)  # its B = 0: proj still counts
    assert proj.lora_a.requires_grad and proj.lora_b.requires_grad, "adding qkv later froze the proj factors"
    assert not a.in_proj_weight.requires_grad and not proj.base.weight.requires_grad
    with pytest.raises(ValueError, match="block 0 proj has LoRA already"):
        add_clip_lora(blocks, [0], ["proj"], 2, 2.0)
    with pytest.raises(ValueError, match="unknown CLIP LoRA target 'out'"):
        add_clip_lora(blocks, [0], ["out"], 2, 2.0)


def test_only_the_factors_and_the_current_context_train_and_bad_settings_are_rejected(tmp_path):
    method = _trainer(tmp_path, ["method.targets=[qkv, fc1]", "method.blocks=[1]"], "tiny_clip_lora").method
    assert sorted(method.tuned) == ["b1.fc1", "b1.qkv"]
    names = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in method.image_parameters()}
    assert names == {"attn.lora_a", "attn.lora_b", "c_fc.lora_a", "c_fc.lora_b"}
    method = _trainer(tmp_path / "p", ["method.targets=[fc2, proj]"], "tiny_clip_lora").method
    assert list(method.tuned) == ["b0.fc2", "b0.proj", "b1.fc2", "b1.proj"]  # as given: the draws' order
    method.begin_task(0)
    method.train()
    with torch.enable_grad():
        method(torch.rand(2, 3, 16, 16)).logits.sum().backward()
    proj = method.tuned["b1.proj"]
    assert proj.lora_b.grad is not None and proj.lora_b.grad.norm() > 0, "the proj LoRA is bypassed"
    assert method.trainable_parameters()[-1] is method.text_ctx[0]
    with pytest.raises(ConfigError, match="method.targets must be distinct names from qkv, proj, fc1, fc2"):
        _trainer(tmp_path / "b", ["method.targets=[qkv, out]"], "tiny_clip_lora")
    with pytest.raises(ConfigError, match="method.blocks: block 2 does not exist in a 2-block backbone"):
        _trainer(tmp_path / "c", ["method.blocks=[2]"], "tiny_clip_lora")


def test_pgp_keeps_old_images_features_and_the_frozen_weights(tmp_path):
    rel_on, moved_on, same_on = old_image_features_change(tmp_path / "on", True, "tiny_clip_lora_pgp", KINDS)
    rel_off, _, same_off = old_image_features_change(tmp_path / "off", False, "tiny_clip_lora", KINDS)
    assert same_on and same_off
    assert rel_on < 1e-5 and moved_on > 1e-3, "the factors still learn, outside the old inputs' span"
    assert rel_off > 1e3 * rel_on


def test_pgp_keeps_old_images_features_with_lora_on_the_output_projection_too(tmp_path):
    """At eps 1 the attention's outputs span all 64 dims of the tiny tower, so PGP freezes the proj
    factors there and qkv (inputs after a LayerNorm: one direction left) learns; at eps 0.9 the proj
    factors learn too, and their real change over task 2 stays out of the old inputs' span."""
    targets = ["method.targets=[qkv, proj]"]
    rel_on, moved_on, _ = old_image_features_change(tmp_path / "on", True, "tiny_clip_lora_pgp", KINDS, targets)
    rel_off, _, _ = old_image_features_change(tmp_path / "off", False, "tiny_clip_lora", KINDS, targets)
    assert rel_on < 1e-5 and moved_on > 1e-3 and rel_off > 1e3 * rel_on
    tr = _trainer(tmp_path / "eps", ["method.targets=[proj]", "pgp.eps={lora_a: 0.9, lora_b: 0.9}",
                                     "train.optimizer=adam", "pgp.target=update", "train.lr=0.05"], "tiny_clip_lora_pgp")
    proj = tr.method.tuned["b1.proj"]
    tr.run_task(0)
    before = proj.lora_a.detach().clone()
    tr.run_task(1)
    records = {p["group"]: p for p in tr.results.projection if p["task"] == 1}
    a = records["b1.proj.A"]
    assert 0 < a["rank"] < a["dim"] == 64 and a["leak"] < 1e-5, a
    assert float((proj.lora_a.detach() - before).norm() / before.norm()) > 1e-3, "the proj factors did not learn"


def test_killed_mid_task_resumes_exactly(tmp_path):
    assert_killed_mid_task_resumes_exactly(tmp_path, "tiny_clip_lora_pgp")


def test_cli_paired_runs_and_report(tmp_path, capsys):
    out = paired_cli_runs(tmp_path, capsys, "tiny_clip_lora", {f"b{i}.qkv.{f}" for i in range(2) for f in "AB"})
    assert "clip_lora-PGP" in out and "PGP - baseline" in out and "b1.qkv.B" in out


def test_full_size_presets_follow_the_clip_protocol():
    from pgpcl.config import load_config

    lora, prompt = load_config("cifar100_10_clip_lora_pgp"), load_config("cifar100_10_clip_pgp")
    assert lora.method.name == "clip_lora" and lora.pgp.enabled and not load_config("cifar100_10_clip_lora").pgp.enabled
    assert (lora.method.params.rank, lora.method.params.targets) == (8, ["qkv"])
    assert lora.train == prompt.train and lora.data == prompt.data and lora.backbone == prompt.backbone
