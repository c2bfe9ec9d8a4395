"""Adapters beside the frozen ViT's MLPs and Adapter-PGP: the wrapper, what trains, old inputs'
features under PGP, bad input, the CLI and the report. (Shared machinery with LoRA: tests/test_lora.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pgpcl.cli import main
from pgpcl.errors import ConfigError
from pgpcl.models.adapter import AdapterMLP, add_adapters
from test_lora import QUIET, _trainer, eval_and_report, feature_change

pytestmark = pytest.mark.usefixtures("data_one_thread")


def test_adapter_starts_as_the_mlp_and_trains_only_its_maps():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    adapter = AdapterMLP(mlp, 8, 4, 0.5)
    x = torch.randn(3, 5, 8)
    assert torch.equal(adapter(x), mlp(x))  # W_up = 0
    with torch.no_grad():
        adapter.up.normal_()
    expected = mlp(x) + 0.5 * torch.relu(x @ adapter.down.T) @ adapter.up.T
    torch.testing.assert_close(adapter(x), expected)
    adapter(x).sum().backward()
    assert all(p.grad is None for p in mlp.parameters()) and adapter.down.grad is not None


def test_adapters_sit_in_the_chosen_blocks_and_bad_ones_are_rejected(tmp_path):
    method = _trainer(tmp_path, ["method.blocks=[0, 2]"], "tiny_adapter").method
    vit = method.backbone.vit
    assert sorted(method.tuned) == ["b0", "b2"] and isinstance(vit.blocks[2].mlp, AdapterMLP)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.vit.blocks.{b}.mlp.{w}" for b in (0, 2) for w in ("down", "up")} | {
        "head.weight", "head.bias"}
    with pytest.raises(ValueError, match="has an adapter already"):
        add_adapters(vit.blocks, [0], vit.embed_dim, 4, 0.1)
    with pytest.raises(ConfigError, match="method.blocks: block 4 does not exist in a 4-block backbone"):
        _trainer(tmp_path / "b", ["method.blocks=[4]"], "tiny_adapter")


@pytest.mark.parametrize("variant", [("sgd", "gradient", 0.5), ("adam", "update", 0.05)])
def test_pgp_leaves_old_inputs_features_unchanged(tmp_path, variant):
    rel_on = feature_change(tmp_path / "on", True, variant, preset="tiny_adapter")
    rel_off = feature_change(tmp_path / "off", False, variant, preset="tiny_adapter")
    assert rel_on < 1e-5
    assert rel_off > 1e3 * rel_on


def test_cli_paired_runs_and_report(tmp_path, capsys):
    for preset in ("tiny_adapter", "tiny_adapter_pgp"):
        assert main(["train", preset, f"output_dir={tmp_path}", *QUIET]) == 0
    r = json.loads((tmp_path / "tiny_adapter_pgp" / "seed0" / "results.json").read_text())
    assert {p["group"] for p in r["projection"]} == {f"b{i}.{w}" for i in range(4) for w in ("down", "up")}
    assert all(p["rank"] > 0 for p in r["projection"])
    out = eval_and_report(tmp_path, "tiny_adapter", "tiny_adapter_pgp", capsys)
    assert "adapter-PGP" in out and "PGP - baseline" in out and "b3.up" in out
