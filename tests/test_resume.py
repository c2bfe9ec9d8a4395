"""Resume: a training process killed with SIGKILL at several points (mid-epoch, between tasks, while
building a PGP basis) and resumed with ``pgpcl train --resume`` ends with exactly the accuracy matrix,
projection bases and trainable state of an uninterrupted run with the same seed (CPU, deterministic).
Ctrl+C (SIGINT) saves a checkpoint and exits 130 with one line saying how to resume.

The killed processes are forked from the test process (so they skip Python's start-up) and send
themselves the signal at a named point through ``PGPCL_TEST_HOOK``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.engine.checkpoint import last_path, load_checkpoint
from pgpcl.engine.trainer import TEST_HOOK_ENV, Trainer

SMALL = ["train.progress=false", "data.train_per_class=16", "data.test_per_class=10", "train.epochs=2",
         "train.checkpoint_every=3", "pgp.sample_batch_size=16"]  # 80 images / task: 5 steps per epoch; 32-image basis sample: 2 batches
SRC = str(Path(__file__).resolve().parents[1] / "src")


pytestmark = pytest.mark.usefixtures("data_one_thread")


def _child(argv: list[str], hook: str) -> None:
    os.environ[TEST_HOOK_ENV] = hook
    torch.set_num_threads(1)
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli(argv: list[str], hook: str = "") -> int:
    """``pgpcl ARGV`` in a forked process; its exit code (-9 when it SIGKILLed itself)."""
    proc = mp.get_context("fork").Process(target=_child, args=(argv, hook))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode is not None, "training process hung"
    return proc.exitcode


def reference(tmp_path: Path, preset: str, overrides: list[str]) -> Path:
    run_dir = tmp_path / f"reference-{preset}"
    Trainer(load_config(preset, overrides), run_dir).run()
    return run_dir


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert rb["status"] == "complete"
    assert ra["acc"] == rb["acc"]
    assert ra["projection"] == rb["projection"]  # basis rank and leak of every task
    assert ra["basis"] == rb["basis"]  # rank and captured energy of every basis update
    last = sorted((a / "checkpoints").glob("task*.pt"))[-1].name
    sa, sb = (load_checkpoint(d / "checkpoints" / last) for d in (a, b))
    assert sa["pgp"]["bases"].keys() == sb["pgp"]["bases"].keys()
    for name, basis in sa["pgp"]["bases"].items():
        assert torch.equal(basis, sb["pgp"]["bases"][name]), name
    for name, value in sa["method"].items():
        assert torch.equal(value, sb["method"][name]), name


def assert_killed_mid_task_resumes_exactly(tmp_path: Path, preset: str) -> None:
    """``preset`` killed at step 7 of task 1 and resumed ends exactly as an uninterrupted run."""
    ref = reference(tmp_path, preset, SMALL)
    run = tmp_path / "killed"
    assert run_cli(["train", preset, *SMALL, "--run-dir", str(run)], "step:1:7=KILL") == -9
    assert run_cli(["train", "--resume", str(run)]) == 0
    assert_same_run(ref, run)


def test_the_same_command_with_continue_finishes_a_killed_run_exactly(tmp_path, capfd):
    """``pgpcl train CONFIG --continue``, the command a preemptible job runs each time it starts."""
    ref = reference(tmp_path, "tiny_dualprompt_pgp", SMALL)
    run = tmp_path / "killed"
    command = ["train", "tiny_dualprompt_pgp", *SMALL, "--run-dir", str(run), "--continue"]
    assert run_cli(command, "step:1:7=KILL") == -9
    assert load_checkpoint(last_path(run))["position"] == {"task": 1, "stage": "train", "step": 6}
    assert run_cli(command) == 0
    assert_same_run(ref, run)
    resumes = json.loads((run / "results.json").read_text())["resumes"]
    assert [(r["from"], r["world_size"]) for r in resumes] == [("task 2/2, step 6", 1)]
    before = (run / "results.json").read_bytes()
    capfd.readouterr()
    assert run_cli(command) == 0
    assert "already holds this finished run; nothing to train" in capfd.readouterr().out
    assert (run / "results.json").read_bytes() == before


def test_l2p_killed_mid_epoch_between_tasks_and_during_basis_resumes_exactly(tmp_path):
    overrides = [*SMALL, "pgp.target=update"]
    ref = reference(tmp_path, "tiny_l2p_pgp", overrides)
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    # mid-epoch (step 7 of 10, epoch 2) of task 1: the last checkpoint is step 6
    assert run_cli(["train", "tiny_l2p_pgp", *overrides, "--run-dir", str(run)], "step:0:7=KILL") == -9
    assert load_checkpoint(last_path(run))["position"] == {"task": 0, "stage": "train", "step": 6}
    # between tasks: after task 1 is recorded
    assert run_cli(["train", "--resume", str(run)], "task_end:0=KILL") == -9
    assert [p.name for p in ckpts.glob("*.pt")] == ["task000.pt"]
    # during the representation pass of task 2 (L2P builds its basis at task start)
    assert run_cli(["train", "--resume", str(run)], "basis:1=KILL") == -9
    # mid-epoch of task 2, with the projection active and the task-start snapshot in the checkpoint
    assert run_cli(["train", "--resume", str(run)], "step:1:8=KILL") == -9
    assert load_checkpoint(last_path(run))["position"] == {"task": 1, "stage": "train", "step": 6}
    assert run_cli(["train", "--resume", str(run)]) == 0
    assert_same_run(ref, run)
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["task000.pt", "task001.pt"]
    # the resumes whose progress reached the final state (the one killed during the basis left none)
    resumes = json.loads((run / "results.json").read_text())["resumes"]
    assert [r["from"] for r in resumes] == ["task 1/2, step 6", "after task 1/2", "task 2/2, step 6"]


def killed_in_each_task_end_pass_resumes_exactly(tmp_path, preset: str, overrides: list[str], point: str) -> Path:
    """Kill the run in task 1's and again in task 2's end-of-task basis pass (test hook ``point``), then
    resume it to the end: the checkpoint of the last step is the fallback, and the result is exact."""
    ref = reference(tmp_path, preset, overrides)
    run = tmp_path / "killed"
    assert run_cli(["train", preset, *overrides, "--run-dir", str(run)], f"{point}:0=KILL") == -9
    assert load_checkpoint(last_path(run))["position"] == {"task": 0, "stage": "train", "step": 10}
    assert run_cli(["train", "--resume", str(run)], f"{point}:1=KILL") == -9
    assert run_cli(["train", "--resume", str(run)]) == 0
    assert_same_run(ref, run)
    return run


def test_dualprompt_killed_while_building_the_task_end_basis(tmp_path):
    # DualPrompt builds the basis after training
    killed_in_each_task_end_pass_resumes_exactly(tmp_path, "tiny_dualprompt_pgp", SMALL, "basis")


def test_l2p_with_a_protected_head_killed_in_its_task_end_head_pass(tmp_path):
    # L2P builds its own groups at a task's start and the head's after training; the head pass runs
    # again on resume
    run = killed_in_each_task_end_pass_resumes_exactly(tmp_path, "tiny_l2p_pgp", [*SMALL, "pgp.protect_head=true"],
                                                       "head_basis")
    groups = [(b["task"], b["group"]) for b in json.loads((run / "results.json").read_text())["basis"]]
    assert groups.count((0, "head")) == groups.count((1, "head")) == 1


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, TEST_HOOK_ENV: "step:0:4=INT", "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pgpcl", "train", "tiny_l2p", *SMALL, "--run-dir", str(run)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 130, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pgpcl train --resume {run}" in lines[0] and "step 4" in lines[0]
    assert load_checkpoint(last_path(run))["position"] == {"task": 0, "stage": "train", "step": 4}
    assert json.loads((run / "results.json").read_text())["status"] == "running"
    # a started run is not silently restarted
    assert main(["train", "tiny_l2p", *SMALL, "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["status"] == "complete"
    assert not last_path(run).exists()
    # resuming a finished run changes nothing
    before = (run / "results.json").read_bytes()
    assert main(["train", "--resume", str(run)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (run / "results.json").read_bytes() == before


def test_sigterm_mid_task_and_ctrl_c_while_building_a_basis(tmp_path, capfd):
    run = tmp_path / "run"
    assert run_cli(["train", "tiny_l2p_pgp", *SMALL, "--run-dir", str(run)], "step:0:2=TERM") == 143
    assert load_checkpoint(last_path(run))["position"] == {"task": 0, "stage": "train", "step": 2}
    assert "continue with: pgpcl train --resume" in capfd.readouterr().err
    # the representation pass stops at the next batch; the last checkpoint is the one after task 1
    assert run_cli(["train", "--resume", str(run)], "basis:1=INT") == 130
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "while building the PGP basis of task 2/2" in err[0] and "task000.pt" in err[0]
    assert run_cli(["train", "--resume", str(run)]) == 0


def test_resume_a_run_written_before_a_config_key_existed(tmp_path):
    """A run folder from an older pgpcl (no `imports` in its config.yaml or in its checkpoint's config
    record) resumes with the new key at its default, to the same result as an uninterrupted run."""
    import io

    import yaml

    ref = reference(tmp_path, "tiny_l2p_pgp", SMALL)
    run = tmp_path / "old"
    assert run_cli(["train", "tiny_l2p_pgp", *SMALL, "--run-dir", str(run)], "step:0:7=KILL") == -9
    raw = yaml.safe_load((run / "config.yaml").read_text())
    del raw["imports"]
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    for path in (run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        config = json.loads(state["config"])
        del config["imports"]
        state["config"] = json.dumps(config)
        buf = io.BytesIO()
        torch.save(state, buf)
        path.write_bytes(buf.getvalue())
    assert run_cli(["train", "--resume", str(run)]) == 0
    assert_same_run(ref, run)


def test_ctrl_c_as_the_run_finishes_is_acknowledged_not_swallowed(tmp_path, capfd):
    """A signal after the last point that can stop (the final task's end) cannot save anything more: the run
    is complete, and one line says so rather than the Ctrl+C vanishing."""
    run = tmp_path / "run"
    assert run_cli(["train", "tiny_l2p", *SMALL, "train.epochs=1", "--run-dir", str(run)], "task_end:1=INT") == 0
    assert f"pgpcl: note: SIGINT came as the run finished; it is complete and saved in {run}" in capfd.readouterr().err
    assert json.loads((run / "results.json").read_text())["status"] == "complete"
