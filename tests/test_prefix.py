"""The prefix-tuning learner and Prefix-PGP: the attention weights its value protection reads, what
trains, the keys-only and keys-and-values guarantees on old inputs, resume, bad input, the CLI and the
report. (Shared machinery with LoRA: tests/test_lora.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from pgpcl.cli import main
from pgpcl.errors import ConfigError
from test_lora import QUIET, _trainer, cls_features, eval_and_report, feature_change
from test_resume import assert_killed_mid_task_resumes_exactly

pytestmark = pytest.mark.usefixtures("data_one_thread")
KEYS_ONLY = ["method.protect_values=false"]


def test_prefix_weights_are_the_softmax_share_of_the_prefix_positions(tmp_path):
    """Layer 0 recomputed by hand: the tokens' softmax weights over [key-prefix; keys], prefix part."""
    method = _trainer(tmp_path, [], "tiny_prefix").method
    vit, bb = method.backbone.vit, method.backbone
    x = torch.randn(3, 1, 16, 16)
    prefixes = method._prefix_dict()
    with torch.no_grad():
        queries, weights = bb.queries_and_prefix_weights(x, prefixes)
        attn, h = vit.blocks[0].attn, vit.blocks[0].norm1(bb.embed(x))
        H, hd, T = attn.num_heads, attn.head_dim, h.shape[1]
        q, k, _ = attn.qkv(h).reshape(3, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        kp = prefixes[0][0].reshape(1, -1, H, hd).transpose(1, 2)
        logits = torch.cat([q @ kp.transpose(-2, -1), q @ k.transpose(-2, -1)], dim=-1) * attn.scale
        expected = logits.softmax(-1)[..., : kp.shape[2]]
        torch.testing.assert_close(weights[0], expected)
        assert set(weights) == set(queries) == {0, 1, 2, 3} and weights[3].shape == (3, H, T, 2)
        plain = bb.queries(x, range(4), prefixes=prefixes)
        for layer in range(4):  # the materialised product gives the fused kernel's queries
            torch.testing.assert_close(queries[layer], plain[layer], atol=1e-5, rtol=1e-4)


def test_only_the_prefix_and_head_train_and_bad_settings_are_rejected(tmp_path):
    method = _trainer(tmp_path, ["method.layers=[1, 3]"], "tiny_prefix").method
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"prefix", "head.weight", "head.bias"} and method.prefix.shape == (2, 2, 2, 32)
    x = torch.randn(2, 1, 16, 16)
    method(x).logits.sum().backward()
    assert method.prefix.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="method.layers: block 4 does not exist in a 4-block backbone"):
        _trainer(tmp_path / "b", ["method.layers=[4]"], "tiny_prefix")
    with pytest.raises(ConfigError, match="method.length must be >= 1"):
        _trainer(tmp_path / "c", ["method.length=0"], "tiny_prefix")
    with pytest.raises(ConfigError, match="method.layers must be distinct"):
        _trainer(tmp_path / "d", ["method.layers=[1, 1]"], "tiny_prefix")


def _prefix_logits(per_head: bool):
    """Old inputs' attention logits on the first layer's key-prefix: per head q_h K_h^T (B, T, H, L), or
    the full-width q K^T (B, T, L) of the paper's condition (the sum of the heads' logits)."""
    def measure(tr, x):
        method = tr.method
        layer, H = method.layers[0], method.backbone.num_heads
        q = method.backbone.queries(x, [layer], prefixes=method._prefix_dict())[layer]
        k = method.prefix[0, 0]
        if not per_head:
            return q @ k.T
        return torch.einsum("bthd,lhd->bthl", q.unflatten(-1, (H, -1)), k.unflatten(-1, (H, -1)))
    return measure


ADAM = ("adam", "update", 0.05)
# Heads of 64 dimensions against the 33 that the tiny preset's first-layer queries span: the key bases
# leave room to move (at D = 64, 32 per head, the first layer's keys would be frozen by eps 1).
WIDE = ["backbone.embed_dim=128", "method.length=16"]


def _change(tmp_path, pgp, overrides=(), variant=ADAM, measure=None):
    kwargs = {} if measure is None else {"measure": measure}
    return feature_change(tmp_path, pgp, variant, preset="tiny_prefix", overrides=[*WIDE, *overrides], **kwargs)


def test_keys_and_values_protected_keep_old_inputs_features(tmp_path):
    """Keys and values protected (the default): every prefixed layer's output on old inputs is kept, so the final features are
    (measured 5e-7 relative against 0.08 without PGP), while the prefix does move. Adam with target
    update: with SGD the tiny preset's gradients lie in the old span and projecting them freezes all."""
    method_change = []

    def prefix_and_features(tr, x):
        method_change.append(tr.method.prefix.detach().clone())
        return cls_features(tr, x)

    rel_on = _change(tmp_path / "on", True, measure=prefix_and_features)
    before, after = method_change
    assert rel_on < 1e-5 and (after - before).norm() > 1e-3 * before.norm()
    assert _change(tmp_path / "off", False) > 1e4 * rel_on


def test_one_key_basis_per_layer_lets_each_heads_logits_move(tmp_path):
    """key_basis=layer (the paper's full-width rule) keeps the sum of the heads' logits on the prefix,
    not each head's; so with the values protected too, old inputs' features still move."""
    per_head = _prefix_logits(True)
    head_rule = _change(tmp_path / "h", True, KEYS_ONLY, measure=per_head)
    layer_rule = _change(tmp_path / "l", True, [*KEYS_ONLY, "method.key_basis=layer"], measure=per_head)
    summed = _change(tmp_path / "s", True, [*KEYS_ONLY, "method.key_basis=layer"], measure=_prefix_logits(False))
    assert head_rule < 1e-5 and summed < 1e-5 and layer_rule > 1e3 * max(head_rule, summed)
    both_head = _change(tmp_path / "bh", True)
    both_layer = _change(tmp_path / "bl", True, ["method.key_basis=layer"])
    assert both_layer > 1e3 * both_head


def test_keys_alone_keep_the_logits_but_not_the_features(tmp_path):
    """The paper's rule protects the attention logits on the prefix; what old inputs read through the
    value-prefixes still changes, so later layers and the features move."""
    assert _change(tmp_path / "off", False, measure=_prefix_logits(True)) > 1e3 * _change(
        tmp_path / "on", True, KEYS_ONLY, measure=_prefix_logits(True))
    assert _change(tmp_path / "k", True, KEYS_ONLY) > 1e3 * _change(tmp_path / "kv", True)


def test_killed_mid_task_resumes_exactly(tmp_path):
    assert_killed_mid_task_resumes_exactly(tmp_path, "tiny_prefix_pgp")


def test_cli_paired_runs_and_report(tmp_path, capsys):
    assert main(["train", "tiny_prefix", f"output_dir={tmp_path}", *QUIET]) == 0
    assert main(["train", "tiny_prefix_pgp", f"output_dir={tmp_path}", *QUIET]) == 0
    r = json.loads((tmp_path / "tiny_prefix_pgp" / "seed0" / "results.json").read_text())
    groups = {p["group"]: p for p in r["projection"]}
    assert set(groups) == {f"key.l{i}.h{h}" for i in range(4) for h in range(2)} | {f"value.l{i}" for i in range(4)}
    assert all(g["rank"] > 0 for g in groups.values())
    assert all(g["dim"] == 2 for n, g in groups.items() if n.startswith("value"))
    assert main(["train", "tiny_prefix_pgp", "pgp.mode=reference", f"output_dir={tmp_path / 'r'}", *QUIET]) == 2
    assert "set method.key_basis=layer, or keep per-head bases with pgp.mode=feature" in capsys.readouterr().err
    assert main(["train", "tiny_prefix_pgp", "pgp.mode=reference", "method.key_basis=layer",
                 f"output_dir={tmp_path / 'r'}", *QUIET]) == 2  # the value groups have no released arithmetic
    assert "use pgp.mode=feature" in capsys.readouterr().err
    assert main(["train", "tiny_dualprompt_pgp", "pgp.mode=reference", "method.key_basis=head",
                 f"output_dir={tmp_path / 'd'}", *QUIET]) == 2
    assert "set method.key_basis=layer" in capsys.readouterr().err
    out = eval_and_report(tmp_path, "tiny_prefix", "tiny_prefix_pgp", capsys)
    assert "prefix-PGP" in out and "PGP - baseline" in out and "value.l3" in out
