"""CLIP adapters and CLIP-Adapter-PGP on the small random open_clip model: where the adapters sit and
what trains, old images' features under PGP with the frozen CLIP weights untouched, resume, bad input,
the CLI and the report. (The text side is the CLIP prompt learner's: tests/test_clip.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.engine.trainer import Trainer
from pgpcl.errors import ConfigError
from pgpcl.models.adapter import AdapterMLP
from test_resume import assert_killed_mid_task_resumes_exactly

pytestmark = pytest.mark.usefixtures("data_one_thread")
QUIET = ["train.progress=false", "data.train_per_class=16", "data.test_per_class=5"]


def _trainer(tmp_path, overrides=(), preset="tiny_clip_adapter") -> Trainer:
    return Trainer(load_config(preset, [*QUIET, *overrides]), tmp_path / preset)


def test_adapters_sit_in_the_image_tower_and_train_with_the_current_context(tmp_path):
    method = _trainer(tmp_path, ["method.blocks=[1]"]).method
    blocks = method.backbone.clip.visual.transformer.resblocks
    assert sorted(method.tuned) == ["b1"] and isinstance(blocks[1].mlp, AdapterMLP)
    assert not isinstance(blocks[0].mlp, AdapterMLP)
    adapter = blocks[1].mlp
    method.begin_task(1)
    trainable = method.trainable_parameters()
    assert trainable[:2] == [adapter.down, adapter.up] and trainable[2] is method.text_ctx[1]
    state = method.trainable_state_dict()
    assert set(state) == {"backbone.clip.visual.transformer.resblocks.1.mlp.down",
                          "backbone.clip.visual.transformer.resblocks.1.mlp.up", "text_ctx.0", "text_ctx.1"}
    x = torch.rand(2, 3, 16, 16)
    method.train()
    with torch.enable_grad():
        method(x).logits.sum().backward()
    assert adapter.down.grad is not None and method.text_ctx[1].grad is not None
    assert all(p.grad is None for p in adapter.mlp.parameters())
    with pytest.raises(ConfigError, match="method.blocks: block 2 does not exist in a 2-block backbone"):
        _trainer(tmp_path / "b", ["method.blocks=[2]"])
    with pytest.raises(ConfigError, match="method.hidden must be >= 1"):
        _trainer(tmp_path / "c", ["method.hidden=0"])


def old_image_features_change(tmp_path, pgp: bool, preset: str = "tiny_clip_adapter",
                              kinds=("adapter_down", "adapter_up"), extra=()) -> tuple[float, float, bool]:
    """Task 1, then task 2 (Adam, target update, eps 1, no weight decay): relative change of task-1
    images' image features and of the tuned modules, and whether the frozen CLIP weights are bit-identical."""
    eps = ", ".join(f"{k}: 1.0" for k in kinds)
    tr = _trainer(tmp_path, [
        f"pgp.enabled={str(pgp).lower()}", f"pgp.eps={{{eps}}}", "train.optimizer=adam",
        "pgp.target=update", "train.lr=0.05", "method.first_task_lr=0.05", "train.weight_decay=0.0",
        "method.first_task_weight_decay=0.0", "train.epochs=2", *extra,
    ], preset)
    method = tr.method
    tuned = set(method.image_parameters())
    frozen = {k: v.clone() for k, v in method.state_dict().items() if k not in tuned and "text_ctx" not in k}
    tr.run_task(0)
    x, _, _ = next(iter(tr.scenario.sample_loader(0, 64, 64, seed=1, augment=False)))
    with torch.no_grad():
        before = method.encode_image(x).clone()
    adapters = torch.cat([p.detach().flatten() for p in method.image_parameters().values()]).clone()
    tr.run_task(1)
    with torch.no_grad():
        after = method.encode_image(x)
    moved = torch.cat([p.detach().flatten() for p in method.image_parameters().values()]) - adapters
    now = method.state_dict()
    same = all(torch.equal(v, now[k]) for k, v in frozen.items())
    return float((after - before).norm() / before.norm()), float(moved.norm() / adapters.norm()), same


def test_pgp_keeps_old_images_features_and_the_frozen_weights(tmp_path):
    rel_on, moved_on, same_on = old_image_features_change(tmp_path / "on", True)
    rel_off, _, same_off = old_image_features_change(tmp_path / "off", False)
    assert same_on and same_off
    assert rel_on < 1e-5 and moved_on > 1e-3, "the adapters still learn, outside the old inputs' span"
    assert rel_off > 1e3 * rel_on


def test_killed_mid_task_resumes_exactly(tmp_path):
    assert_killed_mid_task_resumes_exactly(tmp_path, "tiny_clip_adapter_pgp")


def paired_cli_runs(tmp_path, capsys, preset: str, groups: set[str], refusal: str = "use pgp.mode=feature") -> str:
    """``preset`` and ``preset``_pgp through the CLI (reference mode refused), the PGP run's groups
    checked; ``pgpcl eval`` and ``pgpcl report`` of the pair: the report's text."""
    from test_lora import eval_and_report

    for name in (preset, f"{preset}_pgp"):
        assert main(["train", name, f"output_dir={tmp_path}", *QUIET]) == 0
    r = json.loads((tmp_path / f"{preset}_pgp" / "seed0" / "results.json").read_text())
    assert {p["group"] for p in r["projection"]} == groups
    assert main(["train", f"{preset}_pgp", "pgp.mode=reference", f"output_dir={tmp_path / 'r'}", *QUIET]) == 2
    assert refusal in capsys.readouterr().err
    return eval_and_report(tmp_path, preset, f"{preset}_pgp", capsys)


def test_cli_paired_runs_and_report(tmp_path, capsys):
    out = paired_cli_runs(tmp_path, capsys, "tiny_clip_adapter", {f"b{i}.{w}" for i in range(2) for w in ("down", "up")})
    assert "clip_adapter-PGP" in out and "PGP - baseline" in out and "b1.up" in out


def test_full_size_presets_follow_the_clip_protocol():
    """cifar100_10_clip_adapter(_pgp): the CLIP prompt learner's released schedule and data, adapters
    instead of the image prompt."""
    adapter, prompt = load_config("cifar100_10_clip_adapter_pgp"), load_config("cifar100_10_clip_pgp")
    assert adapter.method.name == "clip_adapter" and adapter.pgp.enabled
    assert (adapter.method.params.hidden, adapter.method.params.scale, adapter.method.params.blocks) == (64, 0.1, None)
    assert adapter.train == prompt.train and adapter.data == prompt.data and adapter.backbone == prompt.backbone
    a, p = adapter.method.params, prompt.method.params
    assert (a.text_length, a.first_task_lr, a.first_task_weight_decay) == (p.text_length, p.first_task_lr,
                                                                          p.first_task_weight_decay)
    assert not load_config("cifar100_10_clip_adapter").pgp.enabled
