"""CLIP with a projected and a free image prompt (pgpcl's reading of PEGP's CLIP variant) on the small
random open_clip model: the two branches, the loss and the averaged prediction re-derived by hand, what
PGP protects (the projected prompt only), resume, the CLI and the report."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pgpcl.cli import main
from pgpcl.errors import ConfigError
from test_clip_adapter import QUIET, _trainer
from test_lora import eval_and_report
from test_resume import assert_killed_mid_task_resumes_exactly

pytestmark = pytest.mark.usefixtures("data_one_thread")
D = 64  # vision width of pgpcl-tiny-clip


def test_two_branches_their_loss_and_the_averaged_prediction(tmp_path):
    tr = _trainer(tmp_path, ["method.consistency_weight=0.5"], "tiny_clip_dual_pgp")
    method, scenario = tr.method, tr.scenario
    method.begin_task(1)
    method.train()
    assert method.trainable_parameters() == [method.image_prompt, method.free_prompt, method.text_ctx[1]]
    assert not torch.equal(method.image_prompt, method.free_prompt)  # two draws
    assert sorted(method.trainable_state_dict()) == ["free_prompt", "image_prompt", "text_ctx.0", "text_ctx.1"]
    assert [g.param for g in method.protected_groups({"prompt": 0.9})] == [method.image_prompt]
    x, y, _ = next(iter(scenario.train_loader(1, 8, generator_seed=0)))
    mask = scenario.class_mask(1)
    out = method(x)
    bb = method.backbone
    scale = bb.logit_scale().float()
    f_p = F.normalize(bb.encode_image(x, method.image_prompt).float(), dim=-1)
    f_f = F.normalize(bb.encode_image(x, method.free_prompt).float(), dim=-1)
    txt = method.text_features(1)
    by_hand = [scale * f @ txt.T for f in (f_p, f_f)]
    torch.testing.assert_close(out.logits, (by_hand[0] + by_hand[1]) / 2)
    ce = sum(F.cross_entropy(lg.masked_fill(~mask, float("-inf")), y) for lg in by_hand)
    expected = ce + 0.5 * (1 - F.cosine_similarity(f_p, f_f)).mean()
    loss = method.loss(out, y, mask)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert method.free_prompt.grad.abs().sum() > 0 and method.image_prompt.grad.abs().sum() > 0
    method.eval()
    torch.testing.assert_close(method.predict(x), scale * ((f_p + f_f) / 2).detach() @ method.text_features(None).T)
    with pytest.raises(ConfigError, match="method.consistency_weight must be >= 0"):
        _trainer(tmp_path / "bad", ["method.consistency_weight=-1"], "tiny_clip_dual")


def _old_tokens_times_prompts(tmp_path, pgp: bool) -> tuple[float, float]:
    """Task 1, then task 2 (Adam, target update, eps 1): relative change of X_old P^T for the projected
    prompt and for the free one."""
    tr = _trainer(tmp_path, [
        f"pgp.enabled={str(pgp).lower()}", "pgp.eps={prompt: 1.0}", "train.optimizer=adam", "pgp.target=update",
        "train.lr=0.05", "method.first_task_lr=0.05", "train.weight_decay=0.0", "method.first_task_weight_decay=0.0",
    ], "tiny_clip_dual")  # fmt: skip
    m = tr.method
    tr.run_task(0)
    x, _, _ = next(iter(tr.scenario.sample_loader(0, 64, 64, seed=1, augment=False)))
    tokens = m.representations(x, None)["prompt"].reshape(-1, D)
    before = {n: p.detach().clone() for n, p in m.image_parameters().items()}
    tr.run_task(1)

    def rel(name: str) -> float:
        old, new = tokens @ before[name].T, tokens @ m.image_parameters()[name].detach().T
        return float((new - old).norm() / old.norm())

    return rel("image_prompt"), rel("free_prompt")


def test_pgp_holds_the_projected_prompt_and_leaves_the_free_one_free(tmp_path):
    proj_on, free_on = _old_tokens_times_prompts(tmp_path / "on", True)
    proj_off, free_off = _old_tokens_times_prompts(tmp_path / "off", False)
    assert proj_on < 1e-3 and proj_off > 100 * max(proj_on, 1e-6)
    assert free_on > 100 * max(proj_on, 1e-6) and free_off > 100 * max(proj_on, 1e-6)


def test_cli_paired_runs_eval_and_report(tmp_path, capsys):
    for name in ("tiny_clip_dual", "tiny_clip_dual_pgp"):
        assert main(["train", name, f"output_dir={tmp_path}", *QUIET]) == 0
    r = json.loads((tmp_path / "tiny_clip_dual_pgp" / "seed0" / "results.json").read_text())
    assert {p["group"] for p in r["projection"]} == {"prompt"} and r["method"] == "clip_dual_prompt"
    out = eval_and_report(tmp_path, "tiny_clip_dual", "tiny_clip_dual_pgp", capsys)
    assert "clip_dual_prompt-PGP" in out and "PGP - baseline" in out


def test_killed_mid_task_resumes_exactly(tmp_path):
    assert_killed_mid_task_resumes_exactly(tmp_path, "tiny_clip_dual_pgp")


def test_full_size_presets_are_clip_pgps_protocol_with_a_second_prompt():
    from dataclasses import asdict

    from pgpcl.config import load_config

    dual, prompt = load_config("cifar100_10_clip_dual_pgp"), load_config("cifar100_10_clip_pgp")
    assert dual.method.name == "clip_dual_prompt" and dual.pgp == prompt.pgp and dual.pgp.enabled
    assert dual.train == prompt.train and dual.data == prompt.data and dual.backbone == prompt.backbone
    assert dual.seed == prompt.seed
    shared = asdict(prompt.method.params)
    assert {k: v for k, v in asdict(dual.method.params).items() if k in shared} == shared
    assert dual.method.params.consistency_weight == 1.0
    assert not load_config("cifar100_10_clip_dual").pgp.enabled
