"""Multi-process training: ``torchrun --nproc_per_node=2 -m pgpcl train`` on CPU (gloo) with PGP on gives
the results of one process with the same global batch (within 1e-4), with the projection active
(target=update: leak ~0) and the same bases on every rank as in one process; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgpcl.config import load_config
from pgpcl.engine.checkpoint import load_checkpoint
from pgpcl.engine.distributed import EpochPlan, shard_batches
from pgpcl.engine.trainer import Trainer

SRC = str(Path(__file__).resolve().parents[1] / "src")
# 85 training images per task in global batches of 12: the last batch holds 1 image, so one rank
# trains on a stand-in with weight 0 there; 16-image PGP sample batches are split between the ranks.
OVERRIDES = ["train.progress=false", "data.train_per_class=17", "data.test_per_class=10", "train.epochs=2",
             "train.batch_size=12", "pgp.target=update", "pgp.sample_batch_size=16", "train.eval_batch_size=16"]


def test_epoch_plan_gives_each_rank_a_disjoint_slice_of_every_global_batch():
    one = EpochPlan(85, 12, seed=3)
    plans = [EpochPlan(85, 12, seed=3, rank=r, world=3) for r in range(3)]
    for b in range(one.num_batches):
        whole = [i for i, _ in one.local(b)[0]]
        parts = [p.local(b) for p in plans]
        real = [[i for i, _ in items] for items, ok in parts if ok]
        assert sorted(sum(real, [])) == sorted(whole)
        assert len(set(sum(real, []))) == len(whole)
    assert [ok for _, ok in (p.local(7) for p in plans)] == [True, False, False]  # 85 = 7 * 12 + 1
    assert shard_batches(10, 3, 1, 2) == [[6, 7, 8], [9]] and shard_batches(10, 3, 0, 2) == [[0, 1, 2], [3, 4, 5]]


def two_processes_and_one(root, preset: str, two_only: tuple[str, ...] = ()):
    """``preset`` under ``torchrun --nproc_per_node=2`` (with the overrides ``two_only`` too) into
    root/two, and in this process (one thread) into root/one. Returns (root/one, root/two, the torchrun
    process)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pgpcl", "train", preset, *OVERRIDES, *two_only, "--run-dir", str(root / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(preset, OVERRIDES), root / "one").run()
    finally:
        torch.set_num_threads(n)
    return root / "one", root / "two", proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return two_processes_and_one(tmp_path_factory.mktemp("dist"), "tiny_dualprompt_pgp")


def test_two_processes_match_one_process(runs):
    one, two, proc = runs
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["status"] == "complete" and r2["device"] == "cpu x2"
    assert r2["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch_size": 12}
    for setting in ("cil", "til"):
        for row1, row2 in zip(r1["acc"][setting], r2["acc"][setting]):
            for a, b in zip(row1, row2):
                assert (a is None and b is None) or abs(a - b) <= 1e-4
    s1, s2 = (load_checkpoint(d / "checkpoints" / "task001.pt") for d in (one, two))
    for name, value in s1["method"].items():
        assert torch.allclose(value, s2["method"][name], atol=1e-4, rtol=0), name
    assert proc.stdout.count("results:") == 1  # one summary, from rank 0


def test_projection_active_and_bases_equal_to_one_process(runs):
    one, two, _ = runs
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    task2 = [p for p in r2["projection"] if p["task"] == 1]
    assert task2 and all(p["rank"] > 0 for p in task2)
    assert all(p["leak"] < 1e-5 for p in task2)  # target=update keeps the real change out of span(U)
    assert [(p["group"], p["rank"]) for p in r1["projection"]] == [(p["group"], p["rank"]) for p in r2["projection"]]
    assert [b["rows"] for b in r1["basis"]] == [b["rows"] for b in r2["basis"]]  # every sample, once
    b1, b2 = (load_checkpoint(d / "checkpoints" / "task001.pt")["pgp"]["bases"] for d in (one, two))
    for name, u in b1.items():
        v = b2[name]
        assert u.shape == v.shape
        assert torch.allclose(u @ u.T, v @ v.T, atol=1e-4), name


def test_only_rank_0_writes(runs):
    _, two, proc = runs
    files = sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    # .pgpcl.lock: rank 0's hold on the folder while it trains
    assert files == [".pgpcl.lock", "checkpoints/task000.pt", "checkpoints/task001.pt", "config.yaml", "results.json"]
    assert "Traceback" not in proc.stderr


def test_a_killed_torchrun_job_rerun_with_continue_finishes_as_the_uninterrupted_one(runs, tmp_path):
    """``torchrun ... pgpcl train CONFIG --continue`` twice: rank 0 reads the folder, both ranks resume."""
    from pgpcl.engine.trainer import TEST_HOOK_ENV

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pgpcl",
           "train", "tiny_dualprompt_pgp", *OVERRIDES, "train.checkpoint_every=4", "--run-dir", str(run), "--continue"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(cmd, env={**env, TEST_HOOK_ENV: "step:1:6=KILL"}, capture_output=True, text=True,
                            timeout=400)
    assert killed.returncode != 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["position"] == {"task": 1, "stage": "train", "step": 4}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r, ref = (json.loads((d / "results.json").read_text()) for d in (run, runs[1]))
    assert [(x["from"], x["world_size"]) for x in r["resumes"]] == [("task 2/2, step 4", 2)]
    assert r["acc"] == ref["acc"] and r["projection"] == ref["projection"]


def test_entry_ends_a_torchrun_process_with_os_exit_and_the_code(monkeypatch):
    """Under torchrun the process exits without interpreter teardown of the process group that
    DistributedDataParallel keeps alive (its teardown at exit aborted finished jobs now and then)."""
    from pgpcl import cli

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited) as hard:
        cli.entry()
    assert hard.value.args == (3,)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as normal:
        cli.entry()
    assert normal.value.code == 3


def test_lora_pgp_under_two_processes_matches_one(tmp_path):
    """LoRA's trainable factors live inside the wrapped ViT (not beside it, as prompts do): under DDP
    they must still be found, projected (by reference) and kept equal on both ranks."""
    two_processes_and_one(tmp_path, "tiny_lora_pgp")
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r1["acc"] == r2["acc"]
    task2 = [p for p in r2["projection"] if p["task"] == 1]
    assert len(task2) == 8 and all(p["rank"] > 0 and p["leak"] < 1e-5 for p in task2)
    s1, s2 = (load_checkpoint(tmp_path / d / "checkpoints" / "task001.pt") for d in ("one", "two"))
    assert any("lora_a" in name for name in s1["method"])
    for name, value in s1["method"].items():
        assert torch.allclose(value, s2["method"][name], atol=1e-5, rtol=0), name


def test_two_processes_training_in_pieces_match_one_process_training_whole_batches(tmp_path):
    """train.micro_batches=4 under DDP: each rank's 6 images of a global batch of 12 in pieces of 2, 2, 1, 1,
    gradients all-reduced once per step; the last global batch (1 image) leaves rank 0 three empty pieces
    and rank 1 four, each a stand-in weighted 0, so both ranks take four backward passes."""
    two_processes_and_one(tmp_path, "tiny_dualprompt_pgp", ("train.micro_batches=4",))
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    for setting in ("cil", "til"):
        for row1, row2 in zip(r1["acc"][setting], r2["acc"][setting]):
            for a, b in zip(row1, row2):
                assert (a is None and b is None) or abs(a - b) <= 1e-4
    task2 = [p for p in r2["projection"] if p["task"] == 1]
    assert task2 and all(p["rank"] > 0 and p["leak"] < 1e-5 for p in task2)
    s1, s2 = (load_checkpoint(tmp_path / d / "checkpoints" / "task001.pt") for d in ("one", "two"))
    for name, value in s1["method"].items():
        assert torch.allclose(value, s2["method"][name], atol=1e-4, rtol=0), name


def test_prefix_pgp_with_per_head_blocks_under_two_processes_matches_one(tmp_path):
    """Prefix-PGP: per-head key bases applied as one block projection per layer, value-prefixes, and the
    per-parameter snapshot of target=update, under DDP as in one process."""
    two_processes_and_one(tmp_path, "tiny_prefix_pgp")
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r1["acc"] == r2["acc"]
    task2 = {p["group"]: p for p in r2["projection"] if p["task"] == 1}
    assert set(task2) == {f"key.l{i}.h{h}" for i in range(4) for h in range(2)} | {f"value.l{i}" for i in range(4)}
    assert all(p["leak"] < 1e-4 for name, p in task2.items() if name.startswith("key"))
    s1, s2 = (load_checkpoint(tmp_path / d / "checkpoints" / "task001.pt") for d in ("one", "two"))
    assert torch.allclose(s1["method"]["prefix"], s2["method"]["prefix"], atol=1e-5, rtol=0)


RANK_1_EXTRA = """
import os, sys
from pgpcl.cli import entry
if os.environ["RANK"] == "1":
    sys.argv += sys.argv.pop(1).split()  # rank 1 alone gets the extra overrides
else:
    sys.argv.pop(1)
entry()
"""


def _torchrun_with_rank_1_extra(tmp_path, extra: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "rank1_extra.py"
    script.write_text(RANK_1_EXTRA)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           extra, "train", "tiny_l2p", "train.progress=false", "data.train_per_class=4", "data.test_per_class=4",
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra, phrase", [("seed=3", "this process has seed=3 but rank 0 has 0"),
                                           ("train.lr=0.5", "this process has train.lr=0.5 but rank 0 has")])
def test_a_rank_started_with_another_config_stops_the_run(tmp_path, extra, phrase):
    proc = _torchrun_with_rank_1_extra(tmp_path, extra, "--run-dir", str(tmp_path / "run"))
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("pgpcl: error:")]
    assert len(lines) == 1 and lines[0].startswith("pgpcl: error: [rank 1] ") and phrase in lines[0], proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_rank_0_records_the_message_of_a_failure_met_by_rank_1_only(tmp_path):
    from PIL import Image

    for split, n in (("train", 4), ("test", 6)):
        for k, c in enumerate("abcd"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 10), (60 * k, 40 * i, 100)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    # task 1's last test image: in rank 1's half of its eval batches, and past the 16 test images the
    # set-up forward of every rank reads
    bad = tmp_path / "imgs" / "test" / "d" / "5.png"
    bad.write_bytes(b"not an image")
    run = tmp_path / "run"
    proc = _torchrun_with_rank_1_extra(tmp_path, "", "data.dataset=image_folder", f"data.root={tmp_path / 'imgs'}",
                                       "train.eval_batch_size=2", "--run-dir", str(run))
    assert proc.returncode != 0
    assert f"pgpcl: error: [rank 1] cannot read image {bad}" in proc.stderr, proc.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["error"].startswith(f"rank 1 failed: cannot read image {bad}"), results["error"]


def test_a_config_error_every_rank_meets_is_said_once_by_rank_0(tmp_path):
    """Each rank reads the same command line, so each meets the same unknown key before the process group
    starts; which rank printed first was a race (both lines, or rank 1's alone)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pgpcl",
           "train", "tiny_l2p", "train.lrr=0.1", "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("pgpcl: ")]
    assert proc.returncode != 0 and lines == ["pgpcl: error: unknown config key 'train.lrr'; did you mean "
                                              "'train.lr'?"], proc.stderr
    assert not (tmp_path / "run").exists()
