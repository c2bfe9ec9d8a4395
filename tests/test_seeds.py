"""``pgpcl train CONFIG --seeds 0 1 ...``: one run per seed into its own folder, one after another, then
their report; every folder is checked before the first run trains."""

from __future__ import annotations

import pytest

from pgpcl.cli import main
from pgpcl.engine.results import read_results

pytestmark = pytest.mark.usefixtures("data_one_thread")

SMALL = ["train.progress=false", "data.train_per_class=12", "data.test_per_class=6", "train.max_steps_per_task=2"]


def test_one_run_per_seed_then_their_report(tmp_path, capsys):
    assert main(["train", "tiny_l2p_pgp", "--seeds", "3", "5", *SMALL, f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for seed in (3, 5):
        r = read_results(tmp_path / "tiny_l2p_pgp" / f"seed{seed}" / "results.json")
        assert r.status == "complete" and r.seed == seed and r.config["train"]["max_steps_per_task"] == 2
    assert "Results: 2 run(s) in 1 group(s)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("l2p-PGP "))
    assert line.split()[3] == "2"  # n: both seeds in one group
    assert out.rstrip().endswith(f"pgpcl report {tmp_path}/tiny_l2p_pgp/seed3 {tmp_path}/tiny_l2p_pgp/seed5")


def test_run_dir_holds_a_folder_per_seed(tmp_path, capsys):
    assert main(["train", "tiny_dualprompt", *SMALL, "--seeds", "0", "1", "--run-dir", str(tmp_path / "sweep")]) == 0
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["seed0", "seed1"]
    assert read_results(tmp_path / "sweep" / "seed1" / "results.json").seed == 1


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_a_finished_seed_stops_the_sweep_before_any_run_trains(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["train", "tiny_l2p", *SMALL, "--run-dir", str(sweep / "seed1"), "seed=1"]) == 0
    line = _fails(capsys, ["train", "tiny_l2p", *SMALL, "--seeds", "0", "1", "--run-dir", str(sweep)])
    assert line.startswith(f"pgpcl: error: {sweep / 'seed1'} already holds a finished run; pass --overwrite")
    assert not (sweep / "seed0").exists()  # refused before seed 0 trained


@pytest.mark.parametrize(("extra", "phrase"), [
    (["seed=4"], "--seeds sets each run's seed; drop the seed=... override"),
    (["--seeds", "2"], "--seeds lists a seed twice (1 2 2); give each once"),
    (["--seeds", "x"], "--seeds takes integers, got 'x'"),
])
def test_bad_seeds_are_one_line(tmp_path, capsys, extra, phrase):
    line = _fails(capsys, ["train", "tiny_l2p", *SMALL, f"output_dir={tmp_path}", "--seeds", "1", "2", *extra])
    assert phrase in line
    assert not (tmp_path / "tiny_l2p").exists()


def test_seeds_with_resume_is_refused(tmp_path, capsys):
    line = _fails(capsys, ["train", "--resume", str(tmp_path), "--seeds", "0", "1"])
    assert "drop --run-dir / --overwrite / --seeds" in line


# --continue: train only what is missing --------------------------------------------------------------


def test_continue_keeps_finished_seeds_and_trains_the_rest(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["train", "tiny_l2p", *SMALL, "--run-dir", str(sweep / "seed1"), "seed=1"]) == 0
    kept = (sweep / "seed1" / "results.json").read_bytes()
    capsys.readouterr()
    # a result-neutral key (the thread count) may differ from the finished run's
    assert main(["train", "tiny_l2p", *SMALL, "train.num_threads=1", "--seeds", "0", "1", "--run-dir", str(sweep),
                 "--continue"]) == 0
    out = capsys.readouterr().out
    assert f"seed 0 (2 seeds): {sweep / 'seed0'} (new)" in out
    assert f"seed 1 (2 seeds): {sweep / 'seed1'} (finished, kept)" in out
    assert (sweep / "seed1" / "results.json").read_bytes() == kept
    assert read_results(sweep / "seed0" / "results.json").status == "complete"
    line = next(ln for ln in out.splitlines() if ln.startswith("l2p "))
    assert line.split()[3] == "2"  # both seeds reported


def test_continue_refuses_a_finished_seed_of_another_config_before_any_run_trains(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["train", "tiny_l2p", *SMALL, "train.lr=0.01", "--run-dir", str(sweep / "seed1"), "seed=1"]) == 0
    capsys.readouterr()
    line = _fails(capsys, ["train", "tiny_l2p", *SMALL, "--seeds", "0", "1", "--run-dir", str(sweep), "--continue"])
    assert line.startswith(f"pgpcl: error: {sweep / 'seed1'} holds a finished run of another config (train.lr: "
                           "the run has 0.01, this command gives ")
    assert "pass --overwrite to replace it" in line
    assert not (sweep / "seed0").exists()


def test_continue_on_a_single_run_starts_it_then_trains_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny_dualprompt", *SMALL, "--run-dir", str(run), "--continue"]) == 0
    before = (run / "results.json").read_bytes()
    assert read_results(run / "results.json").status == "complete"
    capsys.readouterr()
    assert main(["train", "tiny_dualprompt", *SMALL, "--run-dir", str(run), "--continue"]) == 0
    assert f"{run} already holds this finished run; nothing to train" in capsys.readouterr().out
    assert (run / "results.json").read_bytes() == before


def test_continue_refuses_a_folder_with_a_run_but_no_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny_l2p", *SMALL, "--run-dir", str(run)]) == 0
    (run / "config.yaml").unlink()
    line = _fails(capsys, ["train", "tiny_l2p", *SMALL, "--run-dir", str(run), "--continue"])
    assert "holds a finished run but no config.yaml, so --continue cannot tell what it trained" in line


@pytest.mark.parametrize(("argv", "phrase"), [
    (["train", "tiny_l2p", "--continue", "--overwrite"], "--continue keeps what a run folder holds and --overwrite"),
    (["train", "--resume", "RUN", "--continue"], "drop --run-dir / --overwrite / --seeds / --continue"),
])
def test_continue_with_overwrite_or_resume_is_refused(tmp_path, capsys, argv, phrase):
    assert phrase in _fails(capsys, argv)
