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
