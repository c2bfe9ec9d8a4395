"""End to end through the CLI: L2P and DualPrompt (with and without PGP) train 2 tasks on offline
data, write results files that ``pgpcl report`` and ``pgpcl eval`` read; frozen weights stay frozen."""

from __future__ import annotations

import json

import pytest
import torch

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.engine.results import read_results
from pgpcl.engine.trainer import Trainer

FAST = ["train.progress=false", "data.train_per_class=24", "data.test_per_class=10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-task run per tiny preset, through ``pgpcl train``."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for preset in ("tiny_l2p", "tiny_l2p_pgp", "tiny_dualprompt", "tiny_dualprompt_pgp"):
        assert main(["train", preset, f"output_dir={root}", *FAST]) == 0
        out[preset] = root / preset / "seed0"
    return out


def test_cli_runs_write_complete_results(runs):
    for preset, run_dir in runs.items():
        r = read_results(run_dir / "results.json")
        assert r.status == "complete"
        assert r.method == preset.split("_")[1]
        assert r.pgp == preset.endswith("_pgp")
        assert len(r.acc["cil"]) == 2 and all(v is not None for v in (r.acc["cil"][0][0], r.acc["cil"][1][1]))
        assert r.acc["cil"][1][0] is None  # a[i][t] is undefined for i > t
        assert r.metrics["cil"]["final_acc"] == pytest.approx((r.acc["cil"][0][1] + r.acc["cil"][1][1]) / 2)
        assert r.weights["source"] == "random"
        assert [t["task"] for t in r.timings] == [0, 1]
        # the process's one-off set-up is charged to its first task, apart from the phases
        assert r.timings[0]["setup_s"] > 0 and r.timings[1]["setup_s"] == 0
        assert (r.timings[0]["basis_s"] > 0) == r.pgp
        assert all(0 < t["checkpoint_s"] < t["train_s"] for t in r.timings)  # the end-of-training one
        assert (run_dir / "config.yaml").exists()
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["task000.pt", "task001.pt"]
        if r.pgp:
            groups = {p["group"] for p in r.projection}
            assert groups == ({"prompt", "key"} if "l2p" in preset else {"g_key.l0", "e_key.l1", "e_key.l2"})


def test_til_accuracy_not_below_cil(runs):
    for run_dir in runs.values():
        r = read_results(run_dir / "results.json")
        for i in range(2):
            assert r.acc["til"][i][1] >= r.acc["cil"][i][1]


def test_report_reads_the_runs(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs.values()), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "l2p" in text and "dualprompt" in text
    assert list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "summary.json").read_text())
    # the PGP runs' subspaces: every protected group, its rank after both tasks and the task-2 leak
    section = text.split("PGP subspaces")[1].splitlines()
    for label, groups in (("l2p-PGP", ("prompt", "key")), ("dualprompt-PGP", ("g_key.l0", "e_key.l1", "e_key.l2"))):
        rows = [line.split() for line in section if line.startswith(label + " ")]
        assert [r[3] for r in rows] == list(groups)
        assert all(r[4] == "32" and len(r) == 9 for r in rows)  # D, 2 ranks, leak max and mean


def test_eval_reproduces_final_accuracies(runs, capsys):
    run_dir = runs["tiny_dualprompt_pgp"]
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    r = read_results(run_dir / "results.json")
    cil_line = next(line for line in out.splitlines() if line.startswith("CIL"))
    assert f"{r.acc['cil'][0][1]:6.2f}" in cil_line and f"{r.acc['cil'][1][1]:6.2f}" in cil_line


def test_finished_run_is_not_overwritten(runs, capsys):
    run_dir = runs["tiny_l2p"]
    before = (run_dir / "results.json").read_bytes()
    code = main(["train", "tiny_l2p", f"output_dir={run_dir.parent.parent}", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a finished run" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert (run_dir / "results.json").read_bytes() == before


def test_unknown_key_exits_2_with_one_line(capsys):
    assert main(["train", "tiny_l2p", "train.epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pgpcl: error: unknown config key 'train.epoch'; did you mean 'train.epochs'?"


def test_configs_lists_presets(capsys):
    assert main(["configs", "--names"]) == 0
    names = capsys.readouterr().out.split("\n")
    assert "cifar100_10_l2p_pgp" in names and "tiny_dualprompt" in names
    assert main(["configs"]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert head.split() == ["preset", "method", "PGP", "dataset", "tasks", "epochs", "backbone", "weights"]
    assert len(rows) == len(names) - 1  # one row per preset (names ends with a newline)
    row = {r.split()[0]: r.split() for r in rows}
    assert row["cifar100_10_l2p_pgp"][1:7] == ["l2p", "yes", "cifar100", "10", "5", "vit_base_patch16_224"]
    # the builtin weights bring their own architecture, not the preset's arch name
    assert " ".join(row["demo_l2p"][2:]) == "- mnist5k 5 2 ViT (28 px, patch 7, D=96, 6 blocks) builtin:vit_fmnist_d96"
    assert main(["configs", "--names", "tiny_l2p"]) == 2
    assert "--names lists every preset; drop it to print tiny_l2p" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tiny_l2p_pgp", "tiny_dualprompt_pgp"])
def test_frozen_backbone_bit_identical_after_training(tmp_path, preset):
    tr = Trainer(load_config(preset, [*FAST, "train.epochs=2"]), tmp_path / "run")
    frozen = {k: v.clone() for k, v in tr.method.backbone.state_dict().items()}
    trainable = {n: p.detach().clone() for n, p in tr.method.named_parameters() if p.requires_grad}
    assert not any(n.startswith("backbone.") for n in trainable)
    tr.run()
    for k, v in tr.method.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    changed = [n for n, p in tr.method.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert "head.weight" in changed and any("prompt" in n for n in changed)


@pytest.mark.parametrize("preset", ["tiny_l2p_pgp", "tiny_clip"])
def test_warm_up_changes_no_state(tmp_path, preset):
    tr = Trainer(load_config(preset, FAST), tmp_path / "run")
    state = {k: v.clone() for k, v in tr.method.state_dict().items()}
    rng, mode = torch.get_rng_state(), tr.method.training
    assert tr._warm_up() > 0
    assert tr.method.training == mode and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in tr.method.state_dict().items())
    assert tr.scenario._sources[0].data.test.cache  # the splits are converted up front


def test_same_seed_same_results(tmp_path):
    accs = []
    for i in range(2):
        tr = Trainer(load_config("tiny_l2p_pgp", FAST), tmp_path / f"r{i}")
        accs.append(tr.run().acc)
    assert accs[0] == accs[1]


def test_a_batch_larger_than_the_task_scales_the_lr_by_the_batch_it_really_takes(tmp_path):
    """Both runs take one step of all 60 images a task; scaling by the configured 100000 made the rate
    1667x too high, silently: chance-level accuracy and no error."""
    from pgpcl.engine.trainer import effective_lr

    cfg = load_config("tiny_l2p", ["train.batch_size=100000"])
    assert effective_lr(cfg, 0.256, 60) == pytest.approx(0.06) and effective_lr(cfg, 0.256, 10**6) == 100
    assert effective_lr(load_config("tiny_l2p", ["train.lr_scale_by_batch=false"]), 0.25, 60) == 0.25
    small = ["train.progress=false", "data.train_per_class=12", "data.test_per_class=6", "train.epochs=2"]
    whole = Trainer(load_config("tiny_l2p", [*small, "train.batch_size=60"]), tmp_path / "a").run()
    huge = Trainer(load_config("tiny_l2p", [*small, "train.batch_size=100000"]), tmp_path / "b").run()
    assert huge.acc == whole.acc and [t["steps"] for t in huge.timings] == [2, 2]


def test_train_mask_restricts_loss_to_current_task(tmp_path):
    tr = Trainer(load_config("tiny_l2p", FAST), tmp_path / "run")
    method = tr.method
    x, y, t = next(iter(tr.scenario.train_loader(1, 8, generator_seed=0)))
    out = method(x, t)
    mask = tr.scenario.class_mask(1)
    loss = method.loss(out, y, mask)
    out.logits.retain_grad()
    loss.backward()
    # classes outside task 1 receive no gradient through the logits
    assert torch.all(out.logits.grad[:, ~mask] == 0)
    assert torch.any(out.logits.grad[:, mask] != 0)


def test_bf16_on_a_cpu_without_bf16_arithmetic_warns(tmp_path, monkeypatch, capsys):
    from pgpcl.engine import seed

    flags = tmp_path / "cpuinfo"
    flags.write_text("processor : 0\nflags : fpu sse2 avx2\n")
    assert seed.cpu_has_bf16(str(flags)) is False
    flags.write_text("flags : fpu avx2 avx512f avx512_bf16\n")
    assert seed.cpu_has_bf16(str(flags)) is True
    assert seed.cpu_has_bf16(str(tmp_path / "absent")) is None

    cpu = torch.device("cpu")
    monkeypatch.setattr(seed, "cpu_has_bf16", lambda: False)
    assert seed.bf16_cpu_warning("none", cpu) is None
    Trainer(load_config("tiny_l2p", ["train.progress=false", "train.amp=bf16"]), tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.amp=bf16 on a CPU without AVX512-BF16 or AMX" in err[0], err
    monkeypatch.setattr(seed, "cpu_has_bf16", lambda: True)
    assert seed.bf16_cpu_warning("bf16", cpu) is None


def test_compiled_blocks_give_the_same_run(tmp_path):
    """backbone.compile=true wraps every block with torch.compile ('eager' backend here: the plumbing, not
    inductor's code generation) and trains to the same accuracy matrix."""
    base = ["train.progress=false", "data.train_per_class=16", "data.test_per_class=10"]
    plain = Trainer(load_config("tiny_dualprompt_pgp", base), tmp_path / "plain")
    plain.run()
    comp = Trainer(load_config("tiny_dualprompt_pgp", [*base, "backbone.compile=true",
                                                       "backbone.compile_backend=eager"]), tmp_path / "comp")
    assert all(blk._compiled_call_impl is not None for blk in comp.method.backbone.vit.blocks)
    comp.run()
    a, b = (read_results(d / "results.json") for d in (tmp_path / "plain", tmp_path / "comp"))
    for setting in ("cil", "til"):
        assert a.acc[setting] == b.acc[setting]


def test_tensorboard_logs_training_and_evaluation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = load_config("tiny_l2p_pgp", ["train.progress=false", "train.tensorboard=true", "train.log_every=1",
                                       "data.train_per_class=16", "data.test_per_class=10"])
    Trainer(cfg, run).run()
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_task0", "train/loss_task1"} <= tags
    assert len(acc.Scalars("train/loss_task0")) == 5  # 80 images / batch 16, one epoch, every step logged
    results = read_results(run / "results.json")
    for setting in ("cil", "til"):
        logged = [e.value for e in acc.Scalars(f"eval/{setting}_avg_acc")]
        assert logged == pytest.approx([sum(col) / len(col) for col in
                                        ([results.acc[setting][i][t] for i in range(t + 1)] for t in range(2))])
    for group in ("prompt", "key"):  # PGP: basis rank after each task's update, leak of the projected task
        ranks = [(e.step, e.value) for e in acc.Scalars(f"pgp/rank_{group}")]
        assert ranks == [(b["task"], b["rank_after"]) for b in results.extra["basis"] if b["group"] == group]
        leaks = [(e.step, e.value) for e in acc.Scalars(f"pgp/leak_{group}")]
        expected = [(p["task"], p["leak"]) for p in results.projection if p["group"] == group]
        assert [s for s, _ in leaks] == [1] and leaks[0][1] == pytest.approx(expected[0][1], rel=1e-6)


def test_online_trains_one_pass_per_task_and_says_epochs_are_unused(tmp_path, capsys):
    cfg = load_config("tiny_l2p", ["train.progress=false", "data.setting=online", "train.epochs=3"])
    Trainer(cfg, tmp_path / "run").run()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.setting=online" in err[0] and "train.epochs=3 is not used" in err[0]
    timings = read_results(tmp_path / "run" / "results.json").timings
    assert [t["steps"] for t in timings] == [13, 13]  # 5 digits x 40 images per task, batch 16, one pass


def test_a_note_that_every_run_of_a_demo_meets_is_printed_once(tmp_path, capsys):
    from pgpcl.engine.trainer import each_note_once

    cfg = load_config("tiny_l2p", ["train.progress=false", "data.setting=online", "train.epochs=2"])
    other = load_config("tiny_l2p", ["train.progress=false", "data.setting=online", "train.epochs=4"])
    with each_note_once():
        for k, c in enumerate([cfg, cfg, other, cfg]):
            Trainer(c, tmp_path / f"run{k}")  # the note is printed while the trainer is set up
    err = capsys.readouterr().err.strip().splitlines()
    assert [("train.epochs=2" in e, "train.epochs=4" in e) for e in err] == [(True, False), (False, True)]
    Trainer(cfg, tmp_path / "run_after")  # outside the block every run says it again
    assert "train.epochs=2 is not used" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tiny_l2p", "tiny_dualprompt"])
def test_evaluation_reuses_cached_queries_and_gives_the_same_accuracies(tmp_path, preset):
    from pgpcl.engine.trainer import evaluate_method

    tr = Trainer(load_config(preset, ["train.progress=false", "data.test_per_class=30", "train.eval_batch_size=64"]),
                 tmp_path / "run")
    tr.run()
    method = tr.method.eval()
    calls = []
    original = method.backbone.query
    method.backbone.query = lambda x: calls.append(len(x)) or original(x)
    plain0 = evaluate_method(method, tr.scenario, 0, tr.cfg, tr.device)
    plain = evaluate_method(method, tr.scenario, 1, tr.cfg, tr.device)
    assert sum(calls) == 450  # without a cache: (1 + 2) tasks x 5 digits x 30 test images
    cache, calls[:] = {}, []
    first = evaluate_method(method, tr.scenario, 0, tr.cfg, tr.device, query_cache=cache)
    assert sum(calls) == 150 and len(cache) == 3  # task 0: batches of 64, 64, 22
    second = evaluate_method(method, tr.scenario, 1, tr.cfg, tr.device, query_cache=cache)
    assert sum(calls) == 300  # only task 1's images were queried again
    assert (first.cil, first.til) == (plain0.cil, plain0.til)
    assert (second.cil, second.til) == (plain.cil, plain.til)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bars_for_training_basis_and_evaluation(tmp_path, capsys, monkeypatch, progress):
    """With train.progress the long phases show a bar each on a terminal (the PGP pass and evaluation
    take minutes at the released sizes on a CPU) and each finished task a line; without it neither is
    printed."""
    monkeypatch.setattr("pgpcl.progress.on_terminal", lambda stream=None: True)
    argv = ["train", "tiny_dualprompt_pgp", f"output_dir={tmp_path}", f"train.progress={str(progress).lower()}",
            "data.train_per_class=16", "data.test_per_class=10", "data.num_tasks=2"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    err, out = captured.err, captured.out
    for label in ("task 1/2 train", "task 1/2 PGP basis", "task 1/2 eval", "task 2/2 eval"):
        assert (label in err) == progress, label
    lines = [line for line in out.splitlines() if line.startswith("task ")]
    if progress:
        r = read_results(tmp_path / "tiny_dualprompt_pgp" / "seed0" / "results.json")
        final = r.acc["cil"][0][1], r.acc["cil"][1][1]
        assert lines[0].startswith(f"task 1/2: CIL {r.acc['cil'][0][0]:.2f}  TIL {r.acc['til'][0][0]:.2f} ")
        assert lines[1].startswith(f"task 2/2: CIL {sum(final) / 2:.2f}  TIL ")
        assert "PGP basis" in lines[1] and "eval" in lines[1]
    else:
        assert lines == []
    if progress:
        assert main(["eval", str(tmp_path / "tiny_dualprompt_pgp" / "seed0")]) == 0
        assert "eval after task 2/2" in capsys.readouterr().err


def test_bars_off_build_no_tqdm(monkeypatch):
    """train.progress=false: a phase's bar is a no-op, not a disabled tqdm (whose first construction in
    a process cost ~1 ms, landing in the first phase that asked for one: L2P's first PGP basis pass)."""
    from tqdm.std import tqdm

    from pgpcl.progress import progress

    bar = progress(3, "x", False)
    assert not isinstance(bar, tqdm)
    bar.update()
    bar.set_postfix(loss="1.0")
    bar.close()
    monkeypatch.setattr("pgpcl.progress.on_terminal", lambda stream=None: True)
    on = progress(3, "x", True)
    assert isinstance(on, tqdm)
    on.close()


def test_off_a_terminal_a_phase_writes_a_timed_line_not_a_bar():
    """A log file gets a plain line at most every LINE_EVERY_S seconds, with the count, the time gone and
    left and the last postfix; never a carriage return."""
    import io

    from pgpcl.progress import LineProgress, on_terminal, progress

    assert not on_terminal(io.StringIO())
    now = [100.0]
    out = io.StringIO()
    bar = LineProgress(10, "task 1/2 train", initial=2, every_s=60, stream=out, clock=lambda: now[0])
    for t in (30.0, 59.0):  # within the first minute: nothing
        now[0] = 100 + t
        bar.update()
    assert out.getvalue() == ""
    bar.set_postfix(loss="0.812", acc="71.0")
    now[0] = 160.0
    bar.update()  # 5 of 10 after 60 s, 3 of them done here: 20 s a step, 5 left
    assert out.getvalue() == "task 1/2 train: 5/10 (50%), 1 min 00 s elapsed, ~1 min 40 s left, loss=0.812, acc=71.0\n"
    now[0] = 170.0
    bar.update()  # 10 s after the last line: nothing
    assert out.getvalue().count("\n") == 1
    assert isinstance(progress(3, "x", True), LineProgress)  # pytest's captured stderr is no terminal


def test_a_run_logged_to_a_file_has_lines_not_bars(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pgpcl.progress.LINE_EVERY_S", 0.0)  # every step writes its line
    argv = ["train", "tiny_l2p_pgp", f"output_dir={tmp_path}", "train.progress=true",
            "data.train_per_class=16", "data.test_per_class=10"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    for label in ("task 1/2 train: 1/", "task 1/2 PGP basis: 1/", "task 2/2 eval: 1/"):
        assert label in err, label
    assert "loss=" in err


def test_eval_of_a_dil_run_shows_cil_only(tmp_path, capsys, data_write_image):
    # DIL records no task-restricted accuracy, so eval must not print one either
    for domain in ("photo", "sketch"):
        for split, n in (("train", 4), ("test", 2)):
            for c, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
                for i in range(n):
                    data_write_image(tmp_path / "data" / domain / split / c / f"{i}.png", color=color)
    run = tmp_path / "run"
    argv = ["tiny_l2p_pgp", "data.setting=dil", "data.dataset=image_folder", f"data.root={tmp_path / 'data'}",
            "data.num_tasks=2", "train.progress=false", "--run-dir", str(run)]
    assert main(["train", *argv]) == 0
    assert read_results(run / "results.json").acc["til"] is None
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("CIL per task") for line in lines)
    assert not any(line.startswith("TIL") for line in lines)


def test_a_cosine_schedule_per_epoch_holds_the_lr_within_each_epoch(tmp_path, monkeypatch):
    """train.scheduler_every=epoch (the released CLIP code: T_max = epochs, one step per epoch): every
    step of epoch e trains at peak * (1 + cos(pi e / E)) / 2; per step, the rate falls within the epoch."""
    import math

    from pgpcl.engine import trainer as trainer_module

    seen = {}
    real = trainer_module.make_optimizer

    def capture(*args, **kwargs):
        seen["opt"] = real(*args, **kwargs)
        return seen["opt"]

    monkeypatch.setattr(trainer_module, "make_optimizer", capture)
    for every in ("epoch", "step"):
        tr = Trainer(load_config("tiny_l2p", ["train.progress=false", "data.train_per_class=16", "train.epochs=3",
                                              "train.batch_size=40", "train.scheduler=cosine",
                                              f"train.scheduler_every={every}"]), tmp_path / every)
        lrs = []

        def recording(*a, _train_step=tr.train_step, _lrs=lrs, **k):
            _lrs.append(seen["opt"].param_groups[0]["lr"])
            return _train_step(*a, **k)

        monkeypatch.setattr(tr, "train_step", recording)
        tr.run_task(0)
        peak = trainer_module.effective_lr(tr.cfg, tr.cfg.train.lr, 80)
        assert len(lrs) == 6  # 80 images, batch 40, 3 epochs
        if every == "epoch":
            expected = [peak * (1 + math.cos(math.pi * e / 3)) / 2 for e in (0, 0, 1, 1, 2, 2)]
        else:
            expected = [peak * (1 + math.cos(math.pi * s / 6)) / 2 for s in range(6)]
        assert lrs == pytest.approx(expected)
    assert load_config("cifar100_10_clip_pgp").train.scheduler_every == "epoch"


def test_dualprompt_tasks_past_a_smaller_pool_choose_their_e_prompt_by_key_matching(tmp_path, monkeypatch):
    """The released 20-split config has 10 E-prompts for 20 tasks: a task with a prompt of its own trains
    it (forced); a later task trains the one the batch's queries pick, in training and in the PGP pass,
    with the old tasks' key spaces still projected out of its change."""
    from pgpcl.models.prompts import PromptPool

    forced, real = [], PromptPool.select

    def spy(self, query, top_k, batchwise=False, force_idx=None):
        forced.append(None if force_idx is None else sorted(set(force_idx.tolist())))
        return real(self, query, top_k, batchwise, force_idx)

    monkeypatch.setattr(PromptPool, "select", spy)
    cfg = load_config("tiny_dualprompt_pgp", ["train.progress=false", "data.num_tasks=5", "method.pool_size=2",
                                              "method.shared_prompt_pool=true", "data.train_per_class=8",
                                              "data.test_per_class=4", "pgp.num_samples=16", "pgp.target=update",
                                              "pgp.eps={prefix: 0.99}"])
    tr = Trainer(cfg, tmp_path / "run")
    for task in range(3):
        tr.method.train()
        forced.clear()
        tr.run_task(task)
        chosen = [f for f in forced if f is not None]
        assert (chosen == [[task]] * len(chosen) and chosen) if task < 2 else not chosen, (task, forced[:3])
    leaks = [p["leak"] for p in tr.results.projection if p["task"] == 2]
    assert leaks and max(leaks) < 1e-4  # target update: the protected key-prefixes stay out of the old spaces
    assert tr.results.acc["cil"][2][2] is not None
