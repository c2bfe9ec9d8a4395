"""CODA-Prompt: the assembled prompt, the per-task components (orthonormal start, earlier ones frozen),
PGP on the key-prefixes, resume, the CLI and the report."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.engine.trainer import Trainer
from pgpcl.errors import ConfigError
from pgpcl.methods.coda_prompt import orthonormal_rows
from test_resume import SMALL, assert_same_run, reference, run_cli

QUIET = ["train.progress=false"]
pytestmark = pytest.mark.usefixtures("data_one_thread")
TENSORS = ("components", "keys", "attention")


def _trainer(tmp_path, overrides=(), preset="tiny_coda_prompt") -> Trainer:
    return Trainer(load_config(preset, [*QUIET, *overrides]), tmp_path / preset)


def _rows(t: torch.Tensor, layer: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of one layer of a (M, n_layers, ...) tensor, flattened: (stop - start, F)."""
    return t.detach()[start:stop, layer].reshape(stop - start, -1)


def test_weights_are_the_cosine_of_attended_query_and_key(tmp_path):
    method = _trainer(tmp_path).method
    q = torch.randn(5, 32)
    keys, attention = torch.randn(4, 3, 32), torch.randn(4, 3, 32)
    direct = torch.einsum(
        "bmnd,mnd->bnm", F.normalize(q[:, None, None] * attention, dim=-1), F.normalize(keys, dim=-1)
    )
    torch.testing.assert_close(method.weights(q, keys, attention), direct, rtol=1e-5, atol=1e-6)


def test_orthonormal_rows_are_orthogonal_to_the_old_span():
    torch.manual_seed(0)
    old = torch.randn(3, 10)  # not orthonormal: trained rows are not
    new = orthonormal_rows(old, 4)
    torch.testing.assert_close(new @ new.T, torch.eye(4), atol=1e-5, rtol=0)
    assert float((new @ old.T).abs().max()) < 1e-5


def test_components_per_task_start_orthonormal_and_earlier_ones_stay_frozen(tmp_path):
    tr = _trainer(tmp_path)
    method = tr.method
    per = method.per_task
    assert per == 4 and method.components.shape == (8, 3, 2, 2, 32)
    tr.run_task(0)
    after0 = {n: getattr(method, n).detach().clone() for n in TENSORS}
    method.begin_task(1)
    for name in TENSORS:
        t = getattr(method, name)
        assert torch.equal(t.detach()[:per], after0[name][:per]), f"begin_task changed task 0's {name}"
        for layer in range(t.shape[1]):
            old, new = _rows(t, layer, 0, per), _rows(t, layer, per, 2 * per)
            torch.testing.assert_close(new @ new.T, torch.eye(per), atol=1e-5, rtol=0)
            assert float((new @ old.T).abs().max()) < 1e-4, (name, layer)
    tr.run_task(1)
    for name in TENSORS:
        t = getattr(method, name).detach()
        assert torch.equal(t[:per], after0[name][:per]), f"training task 1 changed task 0's {name}"
        assert not torch.equal(t[per:], after0[name][per:]), f"task 1's {name} did not learn"
    # evaluation after task 1 assembles prompts from both tasks' components
    method.eval()
    q = method.frozen_query(torch.rand(3, 1, 16, 16))
    rows = method._pool(method.keys, False).shape[0]
    assert rows == 2 * per and method.weights(q, method.keys[:rows], method.attention[:rows]).shape == (3, 3, rows)


def test_ortho_penalty_is_zero_at_an_orthonormal_start_and_trains_into_the_loss(tmp_path):
    method = _trainer(tmp_path, ["method.ortho_mu=0.5"]).method.train()
    assert float(method.ortho_penalty().detach()) < 1e-10  # the rows in use start orthonormal
    with torch.no_grad():
        method.keys.mul_(2.0)
    out = method(torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0.1
    out.aux_loss.backward()
    assert float(method.keys.grad.abs().sum()) > 0


def _start_snapshot(method, snaps: dict) -> None:
    """Record the key-prefixes right after each begin_task (after the new rows' re-initialisation)."""
    begin = method.begin_task

    def recording(task: int) -> None:
        begin(task)
        snaps[task] = method.components.detach()[:, :, 0].clone()

    method.begin_task = recording


D = 64  # layer 0's queries span 33 of 64 directions here: room to learn outside them (1 of 32 at D = 32)


def _old_logit_change(tmp_path, pgp: bool, variant: tuple[str, str, float]) -> tuple[dict[int, float], float]:
    """Per prefixed layer, ||Q_old dK^T|| / ||Q_old K^T|| over the training of task 2 (dK: the change of
    every component's key-prefix from task 2's start); and ||dK||."""
    opt, target, lr = variant
    tr = _trainer(tmp_path / f"{pgp}-{opt}", [f"pgp.enabled={str(pgp).lower()}", "pgp.eps={prefix: 1.0}",
                                              f"train.optimizer={opt}", f"pgp.target={target}", f"train.lr={lr}",
                                              "train.epochs=2", "pgp.num_samples=64", f"backbone.embed_dim={D}"])
    snaps: dict[int, torch.Tensor] = {}
    _start_snapshot(tr.method, snaps)
    tr.run_task(0)
    x, _, task = next(iter(tr.scenario.sample_loader(0, 64, 64, seed=1, augment=False)))
    queries = tr.method.representations(x, task)  # {prefix.lN: (B, T, D)}
    tr.run_task(1)
    after = tr.method.components.detach()[:, :, 0]
    change = after - snaps[1]
    rel = {}
    for i, layer in enumerate(tr.method.params.layers):
        q = queries[f"prefix.l{layer}"].reshape(-1, D)
        rel[layer] = float((q @ change[:, i].reshape(-1, D).T).norm() / (q @ snaps[1][:, i].reshape(-1, D).T).norm())
    return rel, float(change.norm())


@pytest.mark.parametrize("variant", [("sgd", "gradient", 2.0), ("adam", "update", 0.5)])
def test_pgp_keeps_old_queries_blind_to_the_components_change(tmp_path, variant):
    rel_on, moved = _old_logit_change(tmp_path, True, variant)
    rel_off, _ = _old_logit_change(tmp_path, False, variant)
    assert moved > 1e-4, "the projected key-prefixes must still learn"
    for layer, r in rel_on.items():
        assert r < 1e-3, layer
        assert rel_off[layer] > 100 * r, layer


def test_bad_pool_sizes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="smaller than the number of tasks"):
        _trainer(tmp_path, ["method.pool_size=1"])
    with pytest.raises(ConfigError, match="cannot be orthogonal keys of width 32; set method.pool_size <= 32"):
        _trainer(tmp_path, ["method.pool_size=66"])
    with pytest.raises(ConfigError, match="method.layers: block 7 does not exist in a 4-block backbone; use 0..3"):
        _trainer(tmp_path, ["method.layers=[0, 7]"])


def test_killed_between_tasks_and_mid_task_resumes_exactly(tmp_path):
    """The new components of task 2 are drawn at its start: a run resumed after task 1 draws the same."""
    ref = reference(tmp_path, "tiny_coda_prompt_pgp", SMALL)
    run = tmp_path / "killed"
    assert run_cli(["train", "tiny_coda_prompt_pgp", *SMALL, "--run-dir", str(run)], "task_end:0=KILL") == -9
    assert run_cli(["train", "--resume", str(run)], "step:1:7=KILL") == -9
    assert run_cli(["train", "--resume", str(run)]) == 0
    assert_same_run(ref, run)


def test_cli_paired_runs_and_report(tmp_path, capsys):
    for preset in ("tiny_coda_prompt", "tiny_coda_prompt_pgp"):
        assert main(["train", preset, f"output_dir={tmp_path}", *QUIET]) == 0
    r = json.loads((tmp_path / "tiny_coda_prompt_pgp" / "seed0" / "results.json").read_text())
    assert {p["group"] for p in r["projection"]} == {"prefix.l0", "prefix.l1", "prefix.l2"}
    assert main(["eval", str(tmp_path / "tiny_coda_prompt_pgp" / "seed0")]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "tiny_coda_prompt" / "seed0"),
                 str(tmp_path / "tiny_coda_prompt_pgp" / "seed0"), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "coda_prompt-PGP" in out and "PGP - baseline" in out and "prefix.l2" in out
