"""The demo pipeline on a tiny budget: every run, the report files, and the shipped backbone."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.engine.results import read_results
from pgpcl.io import sha256_file
from pgpcl.models.weights import resolve_builtin

TINY = ["data.train_per_class=12", "data.test_per_class=6", "train.epochs=1", "pgp.num_samples=32", "train.progress=false"]


def test_shipped_backbone_matches_its_record():
    cfg = load_config("demo_l2p")
    assert cfg.backbone.weights == "builtin:vit_fmnist_d96"
    arch, kwargs, weights = resolve_builtin("vit_fmnist_d96")
    record = json.loads(weights.with_suffix(".json").read_text())
    assert (arch, kwargs) == (record["arch"], record["kwargs"])
    assert sha256_file(weights) == record["sha256"]
    assert record["pretrain"]["dataset"] == "fashion_mnist"  # disjoint from the MNIST digit stream


def test_demo_runs_and_writes_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    # with progress bars on, as users run it in a terminal: the runs' bars, but no line per task of each run
    monkeypatch.setattr("pgpcl.progress.on_terminal", lambda stream=None: True)
    assert main(["demo", "--quick", "--out", str(out), *TINY, "train.progress=true"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "Joint upper bound" in text and "PGP" in text
    assert "task 1/5 train" in captured.err and "task 1/5:" not in text
    runs = sorted(out.glob("demo_*/seed0/results.json"))
    assert [p.parent.parent.name for p in runs] == ["demo_dualprompt", "demo_dualprompt_pgp", "demo_l2p", "demo_l2p_pgp"]
    for path in runs:
        r = read_results(path)
        assert r.status == "complete" and len(r.acc["cil"]) == 5
    summary = json.loads((out / "demo.json").read_text())
    assert 0 <= summary["linear_probe_acc"] <= 100
    assert (out / "report.md").read_text().startswith("# pgpcl demo")
    pngs = list((out / "report").glob("*.png"))
    assert pngs
    for png in pngs:
        Image.open(png).verify()
    # a second call reuses the finished runs instead of overwriting them
    before = runs[0].read_bytes()
    assert main(["demo", "--quick", "--out", str(out), *TINY]) == 0
    assert runs[0].read_bytes() == before


def test_demo_methods_choose_the_learners(tmp_path, capsys):
    from pgpcl.demo import METHODS, demo_configs

    names = [c.name for c in demo_configs(tmp_path, [0], True, [], ("coda_prompt", "lora"))]
    assert names == ["demo_coda_prompt", "demo_coda_prompt_pgp", "demo_lora", "demo_lora_pgp"]
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--methods", "l2p,cdoa"]) == 2
    assert "the demo has no learner 'cdoa'; choose from l2p, dualprompt, coda_prompt, lora, adapter, prefix" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert [c.name for c in demo_configs(tmp_path, [0], True, [], METHODS)][::2] == [f"demo_{m}" for m in METHODS]
    out = tmp_path / "new"
    assert main(["demo", "--quick", "--out", str(out), "--methods", "coda_prompt,lora", *TINY]) == 0
    runs = sorted(p.parent.parent.name for p in out.glob("demo_*/seed0/results.json"))
    assert runs == ["demo_coda_prompt", "demo_coda_prompt_pgp", "demo_lora", "demo_lora_pgp"]
    text = capsys.readouterr().out
    assert "coda_prompt-PGP" in text and "lora-PGP" in text


def test_pretrain_writes_checked_weights_and_its_record(tmp_path, data_write_idx, capsys):
    """pgpcl pretrain on a tiny Fashion-MNIST in the real IDX format: weights without the classifier
    head, a record (data, seed, settings, accuracy, time, sha256), and no silent overwrite."""
    import torch
    from safetensors.torch import load_file

    from pgpcl.errors import PgpclError
    from pgpcl.pretrain import PretrainConfig, pretrain

    labels = list(range(10)) * 4
    root = data_write_idx(tmp_path / "fmnist", labels, labels[:20])
    cfg = PretrainConfig(name="toy", root=str(root), epochs=1, batch_size=16, seed=3, threads=1, vit_kwargs={
        "img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2})
    out = tmp_path / "out"
    record = pretrain(cfg, out, progress=False)
    weights = out / "toy.safetensors"
    assert record == json.loads((out / "toy.json").read_text())
    assert record["sha256"] == sha256_file(weights)
    assert record["pretrain"]["seed"] == 3 and record["pretrain"]["train_images"] == 40
    assert record["pretrain"]["test_images"] == 20 and 0 <= record["fashion_mnist_test_acc"] <= 100
    state = load_file(str(weights))
    assert state and not any(k.startswith("head.") for k in state)
    assert sum(v.numel() for v in state.values()) == record["params"]
    assert state["blocks.0.attn.qkv.weight"].shape == torch.Size([48, 16])
    before = weights.read_bytes()
    with pytest.raises(PgpclError, match="already exists; pass --overwrite"):
        pretrain(cfg, out, progress=False)
    assert weights.read_bytes() == before
    assert main(["pretrain", "--out", str(out), "--name", "toy", "--data-root", str(root), "--epochs", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_an_eps_kind_one_learner_lacks_is_refused_before_any_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "pgp.eps.prompt=0.9", "pgp.eps.prefix=0.9"]) == 2
    assert "pgp.eps.prefix does not apply to l2p (its kinds: key, prompt)" in capsys.readouterr().err
    assert not out.exists()


def test_an_override_after_seeds_is_an_override(tmp_path, capsys):
    # argparse gives every value after --seeds to it; the override must still reach the runs
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seeds", "0", "1", "pgp.eps.prefix=0.9"]) == 2
    assert "pgp.eps.prefix does not apply to l2p" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(out), "--seeds", "0", "one"]) == 2
    assert "--seeds takes integers, got 'one'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "0", "0"], "--seeds names 0 twice"),
    (["--seeds", "0", "1", "--seeds", "1"], "--seeds names 1 twice"),  # repeated --seeds add up
    (["--methods", ""], "--methods names no learner"),
    (["--methods", "all,l2p"], "--methods all stands alone"),
    (["--out", " "], "--out is empty"),
    (["--methods", "l2p,l2p"], "--methods names l2p twice"),
    (["seed=3"], "seed= is refused: choose seeds with --seeds"),
    (["name=x"], "name= is refused: each run is named after its preset"),
    (["output_dir=elsewhere"], "output_dir= is refused: choose the folder with --out"),
    (["pgp.enabled=false"], "so pgp.enabled= is refused; for one side, train its preset alone (pgpcl train demo_l2p or"),
    (["pgp.enabled=true"], "so pgp.enabled= is refused"),
    (["pgp={enabled: false, num_samples: 64}"], "so pgp.enabled= is refused"),
])
def test_demo_refuses_bad_arguments_before_any_run(tmp_path, capsys, args, message):
    # a repeat or a fixed key would send several runs to one folder, where the later reuse the first one's result
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_finished_run_of_another_config_is_not_reused(tmp_path, capsys):
    """The demo reuses finished runs; one that trained something else (older pgpcl, other overrides)
    would be reported as this demo's. It is refused in one line, and --overwrite retrains it."""
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--out", str(out), "--methods", "l2p", *TINY]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run with train.epochs=1, this demo trains 2; pass --overwrite" in err
    assert main([*argv, "train.epochs=2", "--overwrite"]) == 0


def test_a_note_every_run_meets_is_printed_once(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--methods", "l2p", *TINY, "data.setting=online",
                 "train.epochs=2"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "train.epochs=2 is not used" in line]
    assert len(notes) == 1  # two runs, one note


def test_linear_probe_accuracy_weighs_tasks_equally_as_final_accuracy_does():
    """10 of 10 on task 0 and 45 of 90 on task 1: 75% (mean of the tasks), not 55% (per image)."""
    import torch

    from pgpcl.demo import task_mean_accuracy

    correct = torch.tensor([True] * 10 + [True] * 45 + [False] * 45)
    task_of = torch.tensor([0] * 10 + [1] * 90)
    assert task_mean_accuracy(correct, task_of) == pytest.approx(75.0)


def test_an_interrupted_demo_continues_when_run_again(tmp_path, capfd):
    """Ctrl+C saves the running run's checkpoint; its message names the demo command (not train --resume), and
    that command resumes the run from its checkpoint rather than training it again from the start."""
    from test_resume import run_cli

    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--out", str(out), "--methods", "l2p", *TINY]
    assert run_cli(argv, "step:0:1=INT") == 130
    err = capfd.readouterr().err
    assert err.startswith("pgpcl: interrupted ") and "run the same pgpcl demo command again to continue" in err
    assert "train --resume" not in err
    assert run_cli(argv) == 0
    first = json.loads((out / "demo_l2p" / "seed0" / "results.json").read_text())
    assert first["status"] == "complete" and len(first["resumes"]) == 1
