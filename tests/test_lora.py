"""LoRA on the frozen ViT and LoRA-PGP: the wrapped layers, what trains, the property that old inputs'
features do not move under PGP, resume, bad input, the CLI and the report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.engine.trainer import Trainer
from pgpcl.errors import ConfigError
from pgpcl.models.lora import LoRALinear, add_lora
from test_resume import assert_killed_mid_task_resumes_exactly

QUIET = ["train.progress=false"]
pytestmark = pytest.mark.usefixtures("data_one_thread")


def _trainer(tmp_path, overrides=(), preset="tiny_lora") -> Trainer:
    return Trainer(load_config(preset, [*QUIET, *overrides]), tmp_path / preset)


def test_lora_linear_starts_as_the_base_layer_and_trains_only_its_factors():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, rank=2, alpha=4.0)
    x = torch.randn(3, 5, 8)
    assert torch.equal(layer(x), base(x))  # B = 0
    with torch.no_grad():
        layer.lora_b.normal_()
    expected = base(x) + 2.0 * (x @ layer.lora_a.T) @ layer.lora_b.T
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert base.weight.grad is None and layer.lora_a.grad is not None and layer.lora_b.grad is not None


def test_add_lora_wraps_the_named_layers_and_rejects_bad_ones(tmp_path):
    method = _trainer(tmp_path, ["method.targets=[qkv, fc2]", "method.blocks=[1, 3]"]).method
    assert sorted(method.tuned) == ["b1.fc2", "b1.qkv", "b3.fc2", "b3.qkv"]
    vit = method.backbone.vit
    assert isinstance(vit.blocks[1].attn.qkv, LoRALinear) and isinstance(vit.blocks[3].mlp.fc2, LoRALinear)
    assert not isinstance(vit.blocks[0].attn.qkv, LoRALinear)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.vit.blocks.{b}.{m}.lora_{f}" for b in (1, 3)
                         for m in ("attn.qkv", "mlp.fc2") for f in "ab"} | {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="has LoRA already"):
        add_lora(vit.blocks, [1], ["qkv"], 2, 2.0)
    with pytest.raises(ConfigError, match="method.blocks: block 9 does not exist in a 4-block backbone"):
        _trainer(tmp_path / "b", ["method.blocks=[9]"])
    with pytest.raises(ConfigError, match="method.targets must be distinct names from qkv, proj, fc1, fc2"):
        _trainer(tmp_path / "c", ["method.targets=[qkvv]"])


def test_reference_mode_is_refused_with_the_fix(tmp_path, capsys):
    assert main(["train", "tiny_lora_pgp", "pgp.mode=reference", f"output_dir={tmp_path}", *QUIET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use pgp.mode=feature" in err[0] and "b0.qkv.A" in err[0]


D = 64


EPS_KINDS = {"tiny_lora": ("lora_a", "lora_b"), "tiny_adapter": ("adapter_down", "adapter_up"),
             "tiny_prefix": ("prefix", "prefix_value")}


def cls_features(tr: Trainer, x):
    """The backbone's final CLS features of x with the method's own tuned parts: (B, D)."""
    method = tr.method
    prefixes = method._prefix_dict() if hasattr(method, "_prefix_dict") else None
    return method.backbone.forward_features(x, prefixes=prefixes).tokens[:, 0].clone()


def feature_change(tmp_path, pgp: bool, variant: tuple[str, str, float], eps: float = 1.0,
                   preset: str = "tiny_lora", amp: str = "none", overrides=(), measure=cls_features) -> float:
    """Relative change of ``measure(trainer, x)`` (default: the final CLS features) of task-1 images x
    over the training of task 2."""
    opt, target, lr = variant
    kinds = ", ".join(f"{k}: {eps}" for k in EPS_KINDS[preset])
    tr = _trainer(tmp_path / f"{pgp}-{opt}-{target}-{eps}-{len(overrides)}", [
        f"pgp.enabled={str(pgp).lower()}", f"pgp.eps={{{kinds}}}", f"train.optimizer={opt}",
        f"pgp.target={target}", f"train.lr={lr}", "train.epochs=2", "pgp.num_samples=64", f"backbone.embed_dim={D}",
        f"train.amp={amp}", *overrides,
    ], preset)
    tr.run_task(0)
    x, _, _ = next(iter(tr.scenario.sample_loader(0, 64, 64, seed=1, augment=False)))
    with torch.no_grad():
        before = measure(tr, x)
    tr.run_task(1)
    with torch.no_grad():
        after = measure(tr, x)
    return float((after - before).norm() / before.norm())


@pytest.mark.parametrize("variant", [("sgd", "gradient", 0.5), ("adam", "update", 0.05)])
def test_pgp_leaves_old_inputs_features_unchanged(tmp_path, variant):
    """Every wrapped layer's output on old inputs is kept, so the whole backbone's features are (measured
    2e-7 to 3e-7 relative against 0.2 to 0.7 without PGP)."""
    rel_on = feature_change(tmp_path, True, variant)
    rel_off = feature_change(tmp_path, False, variant)
    assert rel_on < 1e-5
    assert rel_off > 1e4 * rel_on


def test_pgp_holds_under_bf16_autocast(tmp_path):
    """train.amp=bf16: bf16 training steps, projection on the fp32 factors (bases from the fp32 basis
    pass); the fp32 features of old inputs must still hold (measured 3e-7 relative, as in fp32)."""
    adam = ("adam", "update", 0.05)
    rel_on = feature_change(tmp_path / "on", True, adam, amp="bf16")
    assert rel_on < 1e-5 and feature_change(tmp_path / "off", False, adam, amp="bf16") > 1e4 * rel_on


def test_a_lower_eps_lets_the_factors_move_the_features_more(tmp_path):
    """Not a freeze: with less of the old input space protected, training moves the backbone's features
    further (on the tiny preset the two tasks' inputs share one span, so old and new move alike)."""
    adam = ("adam", "update", 0.05)
    moves = [feature_change(tmp_path, True, adam, eps) for eps in (1.0, 0.99, 0.9)]
    assert moves[0] < moves[1] < moves[2] < feature_change(tmp_path, False, adam)
    assert moves[2] > 100 * moves[0]


def test_killed_mid_task_resumes_exactly(tmp_path):
    assert_killed_mid_task_resumes_exactly(tmp_path, "tiny_lora_pgp")


def eval_and_report(out_dir, base: str, pgp: str, capsys) -> str:
    """``pgpcl eval`` of the PGP run (seed 0 in ``out_dir``), then ``pgpcl report`` of the pair: its text."""
    assert main(["eval", str(out_dir / pgp / "seed0")]) == 0
    capsys.readouterr()
    assert main(["report", str(out_dir / base / "seed0"), str(out_dir / pgp / "seed0"), "--no-plots"]) == 0
    return capsys.readouterr().out


def test_cli_paired_runs_and_report(tmp_path, capsys):
    for preset in ("tiny_lora", "tiny_lora_pgp"):
        assert main(["train", preset, f"output_dir={tmp_path}", *QUIET]) == 0
    assert main(["train", "tiny_lora_pgp", "pgp.target=update", "name=update", f"output_dir={tmp_path}", *QUIET]) == 0
    r = json.loads((tmp_path / "tiny_lora_pgp" / "seed0" / "results.json").read_text())
    groups = {p["group"]: p for p in r["projection"]}
    assert set(groups) == {f"b{i}.qkv.{f}" for i in range(4) for f in "AB"}
    assert max(g["leak"] for g in groups.values()) > 0.05  # Adam + the released gradient target: reported
    assert all(g["leak"] == 0.0 for n, g in groups.items() if n.endswith(".B") and g["rank"] == g["dim"])
    upd = json.loads((tmp_path / "update" / "seed0" / "results.json").read_text())["projection"]
    assert all(g["leak"] < 1e-5 for g in upd)
    out = eval_and_report(tmp_path, "tiny_lora", "tiny_lora_pgp", capsys)
    assert "lora-PGP" in out and "PGP - baseline" in out and "b3.qkv.B" in out
