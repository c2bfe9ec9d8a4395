"""``train.micro_batches``: each step's batch in pieces, one optimizer step on the summed gradient. Every
learner trains what it trains with the whole batch (PGP on, two tasks, within float rounding), L2P's
batch-wise prompt vote included (taken once, over the whole batch); a run that ran out of memory resumes
in pieces."""

from __future__ import annotations

import json

import pytest
import torch

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.engine.checkpoint import latest_checkpoint, load_checkpoint
from pgpcl.engine.trainer import Trainer, micro_batch_rows
from pgpcl.errors import ConfigError

pytestmark = pytest.mark.usefixtures("data_one_thread")

# 2 tasks of 48 images in batches of 16 (3 steps a task, every one projected on task 2)
SMALL = ["train.progress=false", "data.train_per_class=24", "data.test_per_class=8", "train.epochs=1"]


def test_pieces_are_contiguous_near_equal_and_cover_the_batch():
    assert micro_batch_rows(16, 1) == [slice(0, 16)]
    assert micro_batch_rows(16, 3) == [slice(0, 6), slice(6, 11), slice(11, 16)]
    assert micro_batch_rows(2, 5) == [slice(0, 1), slice(1, 2)]  # never an empty piece in one process
    assert micro_batch_rows(2, 4, keep_empty=True) == [slice(0, 1), slice(1, 2), slice(2, 2), slice(2, 2)]
    for n in range(1, 20):
        for k in range(1, 7):
            rows = micro_batch_rows(n, k)
            assert rows[0].start == 0 and rows[-1].stop == n
            assert all(a.stop == b.start for a, b in zip(rows, rows[1:]))
            sizes = [r.stop - r.start for r in rows]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


# The vote needs queries that differ between images (the pretrained demo backbone; the tiny random one
# gives nearly the same query for every image, and so the same vote in every piece)
VOTES = [("demo_l2p_pgp", ["data.num_tasks=2", "data.class_order=random"]),  # batch-wise, as released
         ("demo_dualprompt_pgp", ["data.class_order=random", "method.pool_size=2"])]  # tasks 3-5 past the pool

LEARNERS = [
    *VOTES,
    ("tiny_l2p_pgp", ["method.batchwise_prompt=false"]),
    ("tiny_dualprompt_pgp", []),
    ("tiny_coda_prompt_pgp", []),
    ("tiny_lora_pgp", ["pgp.target=update"]),
    ("tiny_adapter_pgp", []),
    ("tiny_prefix_pgp", []),
    ("tiny_clip_pgp", []),
    ("tiny_clip_dual_pgp", []),
]


def _train(tmp_path, name: str, preset: str, extra: list[str]) -> dict:
    run = tmp_path / name
    Trainer(load_config(preset, [*SMALL, *extra]), run).run()
    return load_checkpoint(latest_checkpoint(run))  # after the last task


@pytest.mark.parametrize(("preset", "extra"), LEARNERS, ids=[" ".join([p, *e]) for p, e in LEARNERS])
def test_pieces_train_what_the_whole_batch_trains(tmp_path, preset, extra):
    whole = _train(tmp_path, "whole", preset, extra)
    pieces = _train(tmp_path, "pieces", preset, [*extra, "train.micro_batches=3"])
    moved = 0.0
    for name, value in whole["method"].items():
        assert torch.allclose(pieces["method"][name], value, rtol=1e-4, atol=2e-6), name
    first = load_checkpoint(tmp_path / "whole" / "checkpoints" / "task000.pt")["method"]
    moved = max(float((whole["method"][n] - v).abs().max()) for n, v in first.items())
    assert moved > 1e-3  # task 2 did train: the match is not of two untouched states
    for name, u in whole["pgp"]["bases"].items():
        v = pieces["pgp"]["bases"][name]
        assert u.shape == v.shape and torch.allclose(u @ u.T, v @ v.T, atol=1e-4), name


def test_three_pieces_of_a_step_sum_to_its_gradient():
    """One step by hand: the gradient the pieces leave equals the whole batch's before the optimizer."""
    cfg = load_config("tiny_dualprompt", SMALL)
    grads = {}
    for k in (1, 3):
        cfg.train.micro_batches = k
        grads[k] = _one_step_gradients(cfg)
    for name, g in grads[1].items():
        assert torch.allclose(grads[3][name], g, rtol=1e-5, atol=1e-7), name
    assert max(float(g.abs().max()) for g in grads[1].values()) > 0


def _one_step_gradients(cfg) -> dict[str, torch.Tensor]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, Path(d) / "run")
        method = trainer.method
        method.begin_task(0)
        method.train()
        params = method.trainable_parameters()
        opt = torch.optim.SGD(params, lr=0.0)  # a step that moves nothing: the gradients stay to read
        x = torch.rand(16, 1, 16, 16)
        y = torch.tensor(trainer.scenario.task_classes[0] * 8)[:16]
        t = torch.zeros(16, dtype=torch.long)
        mask = trainer.scenario.class_mask(0)
        trainer.train_step(x, y, t, mask, opt, params, task=0, step=1)
        names = {id(p): n for n, p in method.named_parameters()}
        return {names[id(p)]: p.grad.clone() for p in params if p.grad is not None}


@pytest.mark.parametrize(("preset", "extra"), VOTES, ids=[p for p, _ in VOTES])
def test_without_the_whole_batch_vote_the_pieces_would_train_something_else(tmp_path, monkeypatch, preset, extra):
    """What the vote over the whole batch is for: each piece voting on its own rows trains other prompts."""
    import contextlib

    from pgpcl.methods import METHODS

    whole = _train(tmp_path, "whole", preset, extra)
    owner = METHODS.get(load_config(preset).method.name)
    monkeypatch.setattr(owner, "whole_batch", lambda self, x, task: contextlib.nullcontext())
    apart = _train(tmp_path, "apart", preset, [*extra, "train.micro_batches=3"])
    assert any(not torch.allclose(apart["method"][n], v, rtol=1e-4, atol=2e-6) for n, v in whole["method"].items())


@pytest.mark.parametrize("value", ["0", "17"])
def test_micro_batches_outside_one_to_the_batch_size_is_refused(value):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_dualprompt", [f"train.micro_batches={value}"])
    assert str(e.value) == f"train.micro_batches must be in 1..train.batch_size (16), got {value}"


def test_a_run_out_of_memory_in_training_resumes_in_pieces(tmp_path, capsys, monkeypatch):
    real = Trainer.train_step

    def second_task_runs_out(self, *args, **kwargs):
        if kwargs.get("task") == 1 and self.cfg.train.micro_batches == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2048.00 MiB. GPU 0 has ...")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", second_task_runs_out)
    run = tmp_path / "run"
    assert main(["train", "tiny_dualprompt_pgp", *SMALL, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert (f"continue with pgpcl train --resume {run}, add train.micro_batches=2 to that to train each batch "
            "in 2 pieces, or lower train.batch_size and start again with --overwrite") in err
    # in one piece task 2 would run out again: it completes only because the resumed run trains in two
    assert main(["train", "--resume", str(run), "train.micro_batches=2"]) == 0
    assert json.loads((run / "results.json").read_text())["status"] == "complete"
