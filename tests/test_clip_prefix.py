"""Prefix-tuning on CLIP's image tower and CLIP-Prefix-PGP on the small random open_clip model: the
prefixed attention and what it captures, what trains, old images' features under PGP with the frozen
CLIP weights untouched, resume, bad input, the CLI and the report."""

from __future__ import annotations

import pytest
import torch

from pgpcl.errors import ConfigError
from pgpcl.models.clip_prefix import PrefixAttention, add_clip_prefixes
from test_clip import small_clip
from test_clip_adapter import _trainer, old_image_features_change, paired_cli_runs
from test_resume import assert_killed_mid_task_resumes_exactly

pytestmark = pytest.mark.usefixtures("data_one_thread")
KINDS = ("prefix", "prefix_value")


def test_prefixed_attention_and_what_it_captures():
    model, _ = small_clip()
    blocks = model.visual.transformer.resblocks
    attn = add_clip_prefixes(blocks, [0], 3)["l0"]
    assert isinstance(blocks[0].attn, PrefixAttention)
    with torch.no_grad():
        attn.prefix.normal_()
        h = torch.randn(2, 5, 32)
        a = attn.attn
        q, k, v = (h @ a.in_proj_weight.T + a.in_proj_bias).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
        kp, vp = (p.reshape(1, 3, 2, 16).transpose(1, 2).expand(2, -1, -1, -1) for p in attn.prefix)
        w = torch.softmax(q @ torch.cat([kp, k], 2).transpose(-2, -1) / 4.0, -1)
        expected = a.out_proj((w @ torch.cat([vp, v], 2)).transpose(1, 2).reshape(2, 5, 32))
        torch.testing.assert_close(attn(h, h, h)[0], expected, atol=1e-5, rtol=1e-4)
        attn.capture = True
        captured_out = attn(h, h, h)[0]
        queries, weights = attn.captured
        torch.testing.assert_close(captured_out, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(weights, w[..., :3])
        torch.testing.assert_close(queries, q.transpose(1, 2).reshape(2, 5, 32))
    with pytest.raises(ValueError, match="is PrefixAttention, not open_clip's nn.MultiheadAttention"):
        add_clip_prefixes(blocks, [0], 3)


def test_only_the_prefixes_and_the_current_context_train_and_bad_settings_are_rejected(tmp_path):
    method = _trainer(tmp_path, ["method.layers=[1]"], "tiny_clip_prefix").method
    assert sorted(method.tuned) == ["l1"] and list(method.image_parameters()) == [
        "backbone.clip.visual.transformer.resblocks.1.attn.prefix"]
    assert method.trainable_parameters()[-1] is method.text_ctx[0]
    with pytest.raises(ConfigError, match="method.layers: block 2 does not exist in a 2-block backbone"):
        _trainer(tmp_path / "b", ["method.layers=[2]"], "tiny_clip_prefix")
    with pytest.raises(ConfigError, match="method.length must be >= 1"):
        _trainer(tmp_path / "c", ["method.length=0"], "tiny_clip_prefix")


# Heads 64 wide and a 16-token prefix: the old queries and weights leave the prefix room to move at eps 1.
WIDE = ("backbone.embed_dim=128", "backbone.num_heads=2", "method.length=16")


def test_pgp_keeps_old_images_features_and_the_frozen_weights(tmp_path):
    rel_on, moved_on, same_on = old_image_features_change(tmp_path / "on", True, "tiny_clip_prefix_pgp", KINDS, WIDE)
    rel_off, _, same_off = old_image_features_change(tmp_path / "off", False, "tiny_clip_prefix", KINDS, WIDE)
    assert same_on and same_off
    assert rel_on < 1e-5 and moved_on > 1e-3, "the prefixes still learn, outside the old inputs' span"
    assert rel_off > 1e3 * rel_on
    keys_only, _, _ = old_image_features_change(tmp_path / "k", True, "tiny_clip_prefix_pgp", KINDS,
                                                (*WIDE, "method.protect_values=false"))
    assert keys_only > 1e3 * rel_on  # what old images read through the value-prefixes still moves


def test_killed_mid_task_resumes_exactly(tmp_path):
    assert_killed_mid_task_resumes_exactly(tmp_path, "tiny_clip_prefix_pgp")


def test_cli_paired_runs_and_report(tmp_path, capsys):
    groups = {f"key.l{i}.h{h}" for i in range(2) for h in range(2)} | {"value.l0", "value.l1"}
    out = paired_cli_runs(tmp_path, capsys, "tiny_clip_prefix", groups, refusal="set method.key_basis=layer")
    assert "clip_prefix-PGP" in out and "PGP - baseline" in out and "value.l1" in out


def test_full_size_presets_follow_the_clip_protocol():
    from pgpcl.config import load_config

    prefix, prompt = load_config("cifar100_10_clip_prefix_pgp"), load_config("cifar100_10_clip_pgp")
    assert prefix.method.name == "clip_prefix" and prefix.pgp.enabled
    assert not load_config("cifar100_10_clip_prefix").pgp.enabled and prefix.method.params.length == 5
    assert prefix.train == prompt.train and prefix.data == prompt.data and prefix.backbone == prompt.backbone
