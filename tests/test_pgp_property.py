"""The property PGP claims, end to end on a small ViT: after training task 2 with the projection, the
attention logits between task-1 inputs and the prompts are unchanged (design note, section 3):

- L2P (prompt-tuning): X_old P^T, X_old = task-1 patch-embedding tokens, P = the prompt pool;
- DualPrompt (prefix-tuning): Q_old K^T at every prefixed layer, Q_old = W_q LN(x) recorded after
  task 1, K = the key-prefixes (G-prompt and every E-prompt).

With PGP off the same quantities move by orders of magnitude more. With Adam and target=gradient the
projection leaks through Adam's per-coordinate scaling: the leak is measured and reported.
"""

from __future__ import annotations

import pytest
import torch

from pgpcl.config import load_config
from pgpcl.engine.trainer import Trainer

D = 64
OPTIM = {"sgd-gradient": ("sgd", "gradient", 2.0), "adam-update": ("adam", "update", 0.5),
         "adam-gradient": ("adam", "gradient", 0.5)}


def _trainer(tmp_path, preset: str, pgp: bool, variant: str, amp: str = "none", extra=()) -> Trainer:
    opt, target, lr = OPTIM[variant]
    kind = "{prompt: 1.0, key: 1.0}" if "l2p" in preset else "{prefix: 1.0}"
    overrides = [
        "train.progress=false", f"pgp.enabled={str(pgp).lower()}", f"pgp.eps={kind}", f"train.optimizer={opt}",
        f"pgp.target={target}", f"train.lr={lr}", "train.epochs=2", f"backbone.embed_dim={D}",
        "pgp.num_samples=64", f"train.amp={amp}", *extra,
    ]
    return Trainer(load_config(preset, overrides), tmp_path / f"{preset}-{pgp}-{variant}-{amp}-{'-'.join(extra)}")


def _rel(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after - before).norm() / before.norm())


def _task1_images(tr: Trainer):
    return next(iter(tr.scenario.sample_loader(0, 64, 64, seed=1, augment=False)))


def l2p_change(tmp_path, pgp: bool, variant: str, amp: str = "none") -> tuple[float, float, Trainer]:
    """Relative change of X_old P^T over task 2, and the norm of the prompt change."""
    tr = _trainer(tmp_path, "tiny_l2p", pgp, variant, amp)
    tr.run_task(0)
    x, _, _ = _task1_images(tr)
    tokens = tr.method.backbone.patch_tokens(x).detach().reshape(-1, D)
    before = tr.method.pool.prompts.detach().clone().reshape(-1, D)
    tr.run_task(1)
    after = tr.method.pool.prompts.detach().reshape(-1, D)
    return _rel(tokens @ after.T, tokens @ before.T), float((after - before).norm()), tr


def _key_prefixes(method) -> dict[str, torch.Tensor]:
    """Key-prefix rows (n, D) of every prefixed layer, by PGP group name."""
    out = {f"g_key.l{layer}": method.g_prompt[i, 0] for i, layer in enumerate(method.params.g_layers)}
    for i, layer in enumerate(method.params.e_layers):
        out[f"e_key.l{layer}"] = method.pool.prompts[:, i, 0].reshape(-1, D)
    return {k: v.detach().clone() for k, v in out.items()}


def dualprompt_change(
    tmp_path, pgp: bool, variant: str, amp: str = "none"
) -> tuple[dict[str, float], float, Trainer]:
    """Per prefixed layer, the relative change of Q_old K^T over task 2; and the key-prefix change."""
    tr = _trainer(tmp_path, "tiny_dualprompt", pgp, variant, amp)
    tr.run_task(0)
    x, _, task = _task1_images(tr)
    queries = {k: q.reshape(-1, D) for k, q in tr.method.representations(x, task).items()}
    before = _key_prefixes(tr.method)
    tr.run_task(1)
    after = _key_prefixes(tr.method)
    rel = {k: _rel(q @ after[k].T, q @ before[k].T) for k, q in queries.items()}
    moved = sum(float((after[k] - before[k]).norm()) for k in after)
    return rel, moved, tr


@pytest.mark.parametrize("variant", ["sgd-gradient", "adam-update"])
def test_l2p_old_attention_unchanged_with_pgp(tmp_path, variant):
    rel_on, moved_on, _ = l2p_change(tmp_path, True, variant)
    rel_off, _, _ = l2p_change(tmp_path, False, variant)
    assert moved_on > 1e-3, "the projected prompts must still learn"
    assert rel_on < 1e-3
    assert rel_off > 100 * rel_on


@pytest.mark.parametrize("variant", ["sgd-gradient", "adam-update"])
def test_dualprompt_old_attention_unchanged_with_pgp(tmp_path, variant):
    rel_on, moved_on, _ = dualprompt_change(tmp_path, True, variant)
    rel_off, _, _ = dualprompt_change(tmp_path, False, variant)
    assert moved_on > 1e-4, "the projected key-prefixes must still learn"
    assert set(rel_on) == {"g_key.l0", "e_key.l1", "e_key.l2"}
    for layer, r in rel_on.items():
        assert r < 1e-3, layer
        assert rel_off[layer] > 100 * r, layer


def _g_prompt_head_logits(tmp_path, pgp: bool, key_basis: str) -> tuple[float, float]:
    """Relative change over task 2 of task-1 inputs' per-head logits q_h K_h^T on the first layer's
    G-prompt key-prefix, and of that key-prefix. Heads 64 wide against the 33 dimensions the first
    layer's queries span on the tiny preset, so per-head bases leave the keys room to move."""
    tr = _trainer(tmp_path, "tiny_dualprompt", pgp, "adam-update",
                  extra=("backbone.embed_dim=128", f"method.key_basis={key_basis}"))
    tr.run_task(0)
    x, _, _ = _task1_images(tr)
    H = tr.method.backbone.num_heads
    q = tr.method.backbone.queries(x, [0])[0].unflatten(-1, (H, -1))  # layer 0: no prefix before it

    def logits(k):
        return torch.einsum("bthd,lhd->bthl", q, k.unflatten(-1, (H, -1)))

    before = tr.method.g_prompt[0, 0].detach().clone()
    tr.run_task(1)
    after = tr.method.g_prompt[0, 0].detach()
    return _rel(logits(after), logits(before)), _rel(after, before)


def test_dualprompt_per_head_bases_keep_each_heads_logits(tmp_path):
    """The released full-width rule keeps only the heads' summed logits on the key-prefix; with
    key_basis=head every head's are kept (docs/pgp.md, section 14), and the keys still learn."""
    head_rule, moved = _g_prompt_head_logits(tmp_path, True, "head")
    layer_rule, _ = _g_prompt_head_logits(tmp_path, True, "layer")
    assert moved > 1e-4 and head_rule < 1e-5
    assert layer_rule > 100 * head_rule


def test_old_attention_unchanged_with_pgp_under_bf16_autocast(tmp_path):
    """train.amp=bf16: bases come from bf16 representations, the projection acts on fp32 gradients; the
    fp32 attention logits of task-1 inputs must still hold (measured ~1e-7 relative, as in fp32)."""
    rel_on, moved_on, _ = l2p_change(tmp_path, True, "adam-update", "bf16")
    rel_off, _, _ = l2p_change(tmp_path, False, "adam-update", "bf16")
    assert moved_on > 1e-3 and rel_on < 1e-3 and rel_off > 100 * rel_on
    rel_on, moved_on, _ = dualprompt_change(tmp_path, True, "adam-update", "bf16")
    rel_off, _, _ = dualprompt_change(tmp_path, False, "adam-update", "bf16")
    assert moved_on > 1e-4
    for layer, r in rel_on.items():
        assert r < 1e-3 and rel_off[layer] > 100 * r, layer


def test_adam_with_gradient_target_leak_is_reported(tmp_path):
    rel, _, tr = l2p_change(tmp_path, True, "adam-gradient")
    leaks = {p["group"]: p["leak"] for p in tr.results.projection if p["task"] == 1}
    assert leaks["prompt"] > 0.05  # Adam rescales coordinates: the applied change leaves the complement
    assert rel > 1e-3
    # and target=update, same optimizer, closes it
    _, _, tr2 = l2p_change(tmp_path, True, "adam-update")
    leaks2 = {p["group"]: p["leak"] for p in tr2.results.projection if p["task"] == 1}
    assert leaks2["prompt"] < 1e-4


def test_no_projection_on_first_task(tmp_path):
    _, _, tr = l2p_change(tmp_path, True, "adam-update")
    assert all(p["task"] == 1 for p in tr.results.projection)
    # L2P builds its basis at the start of every task (as released), task 0 included
    assert [b["task"] for b in tr.results.extra["basis"] if b["group"] == "prompt"] == [0, 1]


def test_dualprompt_memory_queries_are_those_of_the_training_forward(tmp_path):
    """The basis pass (true task's E-prompt, blocks up to the last prefixed layer) sees exactly the
    queries that a training forward with the E-prompt forced to the task computes."""
    tr = _trainer(tmp_path, "tiny_dualprompt", True, "sgd-gradient")
    method = tr.method.train()
    x, _, task = _task1_images(tr)
    task = task + 1  # not the prompt a key match or id 0 would give by chance
    _, prefixes = method._prefixes(x, task)
    layers = [layer for *_, layer in method._prefixed_layers()]
    with torch.no_grad():
        full = method.backbone.forward_features(x, prefixes=prefixes, capture_queries=layers).queries
    reps = method.representations(x, task)
    assert set(reps) == {"g_key.l0", "e_key.l1", "e_key.l2"}
    for name, _, _, layer in method._prefixed_layers():
        torch.testing.assert_close(reps[name], full[layer], rtol=0, atol=1e-6)


def test_l2p_projects_a_task_out_of_the_earlier_tasks_spaces_only(tmp_path):
    """L2P builds task t's basis at task t's start, from task t's data; as released it serves from task
    t+1 on: task t itself moves freely inside its own new directions (it used to be projected out of
    them, which kept its keys from moving towards its own queries)."""
    tr = _trainer(tmp_path, "tiny_l2p", True, "sgd-gradient", extra=("pgp.eps={prompt: 0.99, key: 0.999}",))
    tr.run_task(0)
    before, ranks0 = tr.method.pool.prompts.detach().clone(), tr.pgp.pgp.ranks()
    keys0 = tr.method.pool.keys.detach().clone()
    tr.run_task(1)
    ranks1 = tr.pgp.pgp.ranks()
    for group, param, start in (("prompt", tr.method.pool.prompts, before), ("key", tr.method.pool.keys, keys0)):
        r0, r1 = ranks0[group], ranks1[group]
        assert 0 < r0 < r1, (group, r0, r1)  # task 1's build added directions
        basis = tr.pgp.pgp.memory.basis(group)
        delta = (param.detach() - start).reshape(-1, D).double()
        assert float((delta @ basis[:, :r0]).norm() / delta.norm()) < 1e-5  # out of task 0's space
        assert float((delta @ basis[:, r0:r1]).norm() / delta.norm()) > 1e-2  # free in task 1's own
        record = [p for p in tr.results.projection if p["task"] == 1 and p["group"] == group]
        assert record[0]["rank"] == r0  # the rank in force, as results.json reports it


@pytest.mark.parametrize("preset, tasks_with_extra", [("tiny_l2p_pgp", [1, 2]), ("tiny_clip_pgp", [0, 1, 2])])
def test_the_prompt_joins_the_sum_space_from_the_task_the_method_declares(tmp_path, monkeypatch, preset,
                                                                           tasks_with_extra):
    """As released, L2P adds the pool from the second task on (at task 0's start it is its random
    initialisation); CLIP adds its prompt at every task."""
    from pgpcl.projection.pgp import PGP

    seen, real = [], PGP.collect_extra
    tr = Trainer(load_config(preset, ["train.progress=false", "data.num_tasks=5", "data.train_per_class=8",
                                      "data.test_per_class=2", "pgp.num_samples=16"]), tmp_path / "run")
    monkeypatch.setattr(PGP, "collect_extra", lambda self, name, rows: (seen.append(tr.method.current_task),
                                                                          real(self, name, rows))[1])
    for task in range(3):
        tr.run_task(task)
    assert sorted(set(seen)) == tasks_with_extra


def test_l2p_runs_written_before_the_fix_keep_their_semantics(tmp_path):
    """method.pgp_basis=v0.1 is what pgpcl's L2P-PGP computed before 2026-12-03: task t projected out of
    its own new directions too, and the pool in task 0's basis. A stored config without the key (a run
    of that code) reads as v0.1, so it resumes, evaluates and reports as it ran."""
    import yaml

    from pgpcl.config import with_defaults, with_legacy_values
    from pgpcl.engine.evaluate import load_run_config

    tr = _trainer(tmp_path, "tiny_l2p", True, "sgd-gradient",
                  extra=("pgp.eps={prompt: 0.99, key: 0.999}", "method.pgp_basis=v0.1"))
    tr.run_task(0)
    before, r0 = tr.method.pool.prompts.detach().clone(), tr.pgp.pgp.ranks()["prompt"]
    tr.run_task(1)
    r1, basis = tr.pgp.pgp.ranks()["prompt"], tr.pgp.pgp.memory.basis("prompt")
    delta = (tr.method.pool.prompts.detach() - before).reshape(-1, D).double()
    assert r1 >= r0 > 0 and float((delta @ basis[:, :r1]).norm() / delta.norm()) < 1e-5  # out of its own too
    assert [p["rank"] for p in tr.results.projection if p["group"] == "prompt"] == [r1]

    old = load_config("tiny_l2p_pgp").to_dict()
    del old["method"]["pgp_basis"]
    assert with_legacy_values(old)["method"]["pgp_basis"] == "v0.1"
    assert with_defaults(old)["method"]["pgp_basis"] == "v0.1"
    assert with_defaults(load_config("tiny_l2p_pgp").to_dict())["method"]["pgp_basis"] == "released"
    assert "pgp_basis" not in with_legacy_values(load_config("tiny_dualprompt_pgp").to_dict())["method"]
    (tmp_path / "old_run").mkdir()
    (tmp_path / "old_run" / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_run_config(tmp_path / "old_run").method.params.pgp_basis == "v0.1"


def head_change(tmp_path, protect: bool, variant: str, preset: str = "tiny_dualprompt"
                ) -> tuple[float, float, float, Trainer]:
    """pgp.protect_head: relative change over task 2 of the head's logits on the head inputs of task 1's
    basis sample (recorded after task 1), the head weight's relative change and its bias's change."""
    from pgpcl.engine.pgp_hooks import head_rows

    tr = _trainer(tmp_path, preset, True, variant,
                  extra=("pgp.protect_head=true", "pgp.eps.head=1.0") if protect else ())
    tr.run_task(0)
    cfg = tr.cfg
    x, _, task = next(iter(tr.scenario.sample_loader(0, cfg.pgp.num_samples, cfg.pgp.num_samples, seed=cfg.seed,
                                                     augment=cfg.pgp.sample_augment)))
    head = tr.method.head
    with torch.no_grad():
        rows = head_rows(tr.method.eval(), x, task)["head"]
        weight, bias, before = head.weight.detach().clone(), head.bias.detach().clone(), head(rows)
    tr.method.train()
    tr.run_task(1)
    with torch.no_grad():
        after = head(rows)
    return _rel(after, before), _rel(head.weight.detach(), weight), float((head.bias.detach() - bias).norm()), tr


@pytest.mark.parametrize("preset, variant", [("tiny_dualprompt", "sgd-gradient"), ("tiny_dualprompt", "adam-update"),
                                             ("tiny_l2p", "sgd-gradient")])
def test_a_protected_head_keeps_its_logits_on_old_inputs(tmp_path, preset, variant):
    rel, moved, bias_moved, tr = head_change(tmp_path, True, variant, preset)
    assert rel < 1e-3 and moved > 1e-2 and bias_moved == 0.0  # it learns, outside the old inputs' span
    groups = [(r["task"], r["group"]) for r in tr.pgp.basis_log]
    # L2P builds its own groups at a task's start and the head's at its end, after training the task
    assert [g for g in groups if g[1].startswith("head")] == [(0, "head"), (0, "head.bias"), (1, "head"), (1, "head.bias")]
    assert {p["group"] for p in tr.results.projection} >= {"head", "head.bias"}
    rel_off, moved_off, bias_off, _ = head_change(tmp_path / "off", False, variant, preset)
    assert rel_off > 100 * rel and rel_off > 0.1 and bias_off > 0


def test_protect_head_is_refused_without_a_linear_head(tmp_path):
    from pgpcl.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a linear classifier head .* CLIPPrompt has none"):
        Trainer(load_config("tiny_clip_pgp", ["train.progress=false", "pgp.protect_head=true"]), tmp_path / "clip")
    assert not (tmp_path / "clip").exists()
    with pytest.raises(ConfigError, match="group kind 'head', which this method does not know"):
        Trainer(load_config("tiny_dualprompt_pgp", ["train.progress=false", "pgp.eps.head=0.9"]), tmp_path / "eps")
