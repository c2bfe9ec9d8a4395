"""Run folders and the CLI's edges: resolved paths, one process per folder, file modes, interrupts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from pgpcl.cli import main
from pgpcl.engine.rundir import check_run_dir, lock_run_dir, prepare_run_dir, unlock_run_dir
from pgpcl.errors import ConfigError, DataError, PgpclError
from pgpcl.io import atomic_write_text


def _finished_run(folder: Path) -> bytes:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"status": "complete"}))
    return (folder / "results.json").read_bytes()


def test_a_path_through_a_new_folder_and_back_is_checked_as_the_folder_it_names(tmp_path, capsys):
    kept = _finished_run(tmp_path / "old")
    sneaky = tmp_path / "new" / ".." / "old"
    with pytest.raises(PgpclError, match="already holds a finished run"):
        check_run_dir(sneaky, overwrite=False)
    assert main(["train", "tiny_l2p", "train.progress=false", "--run-dir", str(sneaky)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (tmp_path / "old" / "results.json").read_bytes() == kept


def test_empty_run_dir_is_refused(capsys):
    assert main(["train", "tiny_l2p", "--run-dir", ""]) == 2
    assert "--run-dir is empty" in capsys.readouterr().err


@pytest.fixture
def held_folder(tmp_path):
    """(folder, pid): a folder whose run lock another process holds until the test ends."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from pgpcl.engine.rundir import lock_run_dir
            lock_run_dir({str(run)!r})
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield run, holder
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_another_process_holds_is_refused(held_folder):
    run, holder = held_folder
    with pytest.raises(PgpclError) as e:
        prepare_run_dir(run, overwrite=True)
    assert str(e.value).startswith(f"{run} is in use by another pgpcl process (pid {holder.pid})")
    holder.kill()
    holder.wait()
    prepare_run_dir(run, overwrite=True)  # the holder is gone: its lock went with it
    lock_run_dir(run)  # this process already holds it: no-op
    unlock_run_dir(run)


def test_a_killed_trainers_forked_workers_do_not_keep_its_folder_locked(tmp_path):
    """A DataLoader worker is a fork of the trainer and outlives a SIGKILL of it by seconds; the flock
    it inherited would refuse the immediate --resume of a requeued job."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, time
            from pgpcl.engine.rundir import lock_run_dir
            lock_run_dir({str(run)!r})
            child = os.fork()
            if child == 0:  # the "worker": lives on after its parent is gone
                # fork() returns here after the at-fork hooks ran; saying so only now keeps the
                # test from racing a child that a busy machine has not scheduled yet
                print(os.getpid(), flush=True)
                time.sleep(60)
                os._exit(0)
            os._exit(0)  # the trainer dies without unlocking, as under SIGKILL
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    worker = int(holder.stdout.readline())
    holder.wait()
    try:
        os.kill(worker, 0)  # still alive
        lock_run_dir(run)  # taken at once
        unlock_run_dir(run)
    finally:
        os.kill(worker, 9)


def test_resume_commands_in_messages_are_quoted_for_the_shell(tmp_path):
    run = tmp_path / "my runs" / "l2p; rm"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(PgpclError) as e:
        check_run_dir(run, overwrite=False)
    assert f", pgpcl train --resume '{run}' to continue it" in str(e.value)


@pytest.mark.parametrize("how", ["new run", "--overwrite", "--resume"])
def test_train_into_a_folder_in_use_exits_2(held_folder, capsys, how):
    from pgpcl.config import dump_yaml, load_config

    run, holder = held_folder
    small = ["train.progress=false", "data.train_per_class=4", "data.test_per_class=2"]
    (run / "config.yaml").write_text(dump_yaml(load_config("tiny_l2p", small)))
    argv = {"new run": ["train", "tiny_l2p", *small, "--run-dir", str(run)],
            "--overwrite": ["train", "tiny_l2p", *small, "--run-dir", str(run), "--overwrite"],
            "--resume": ["train", "--resume", str(run)]}[how]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # one line: no note about a folder that is another's
    assert len(err) == 1 and f"is in use by another pgpcl process (pid {holder.pid})" in err[0]
    assert not (run / "results.json").exists() and not (run / "checkpoints").exists()


def test_written_files_follow_the_umask(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o666 & ~mask


def test_ctrl_c_outside_training_exits_130_in_one_line(tmp_path):
    # entry() installs the handler before main(): a SIGINT during start-up (torch still importing) exits
    # at once instead of raising KeyboardInterrupt inside half-imported extension modules.
    code = textwrap.dedent("""
        import os, signal, time
        from pgpcl import cli
        cli.main = lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(30))
        cli.entry()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines() == [
        "pgpcl: interrupted; every file already written is whole (files are written atomically)"
    ]


def test_unknown_eps_kind_is_named_with_the_method_kinds():
    from pgpcl.projection.pgp import resolve_eps

    groups = [SimpleNamespace(kind="prompt", eps=None), SimpleNamespace(kind="key", eps=None)]
    with pytest.raises(ConfigError) as e:
        resolve_eps(groups, {"promt": 0.9}, {"prompt": 0.5, "key": 0.97})
    assert str(e.value) == (
        "pgp.eps names group kind 'promt', which this method does not know; did you mean 'prompt'? "
        "its kinds are: key, prompt"
    )


def test_class_without_training_images_is_refused(tmp_path, data_write_idx):
    from pgpcl.config import DataConfig
    from pgpcl.data import build_scenario

    data_write_idx(tmp_path, [0, 1, 2, 3, 4, 5] * 2, list(range(10)))  # classes 6-9: test images only
    with pytest.raises(DataError) as e:
        build_scenario(DataConfig(dataset="mnist", root=str(tmp_path), num_tasks=2, img_size=28, channels=1), 0)
    assert str(e.value).startswith("mnist: 4 of 10 classes have no training images (e.g. '6')")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--out", "FILE"], "is a file, not a folder; choose another --out"),
        (["--out", "FILE/w"], "cannot write to --out"),
        (["--out", ""], "--out is empty; give a folder"),
        (["--name", ""], "--name must be a plain file name (no '/', not '.' or '..'), got ''"),
        (["--name", "../evil"], "--name must be a plain file name"),
        (["--name", ".."], "--name must be a plain file name"),
        (["--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
    ],
)
def test_pretrain_refuses_before_training(tmp_path, capsys, monkeypatch, argv, expected):
    """Checked before the data is read and minutes are spent training: the files are written only at the end."""
    import pgpcl.data

    def never(*a, **k):
        raise AssertionError("pretrain read its data before checking its arguments")

    monkeypatch.setattr(pgpcl.data, "load_dataset", never)
    (tmp_path / "FILE").write_text("")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) if a.startswith("FILE") else a for a in argv]
    assert main(["pretrain", "--out", str(tmp_path / "w"), *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w").exists() and not (tmp_path / "evil.json").exists()
