"""``pgpcl eval RUN_DIR [--all] [--json]``: the run's model rebuilt from its checkpoints and evaluated
again, compared with what results.json recorded; ``--all`` rebuilds the whole accuracy matrix and its
metrics from every end-of-task checkpoint. Exit 1 when the re-evaluation and the file disagree."""

from __future__ import annotations

import json

import pytest

from pgpcl.cli import main
from pgpcl.engine.results import read_results, write_results

pytestmark = pytest.mark.usefixtures("data_one_thread")

SMALL = ["train.progress=false", "data.train_per_class=12", "data.test_per_class=6", "data.num_tasks=5",
         "train.max_steps_per_task=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "tiny_dualprompt_pgp", *SMALL, "--run-dir", str(run)]) == 0
    return run


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns(".pgpcl.lock"))
    return tmp_path / "run"


def test_all_rebuilds_the_recorded_matrices_and_metrics(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "--all", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    recorded = read_results(run / "results.json")
    assert ev["acc"] == recorded.acc  # every entry, None below the diagonal included
    assert ev["metrics"] == recorded.metrics
    assert ev["missing"] == [] and ev["recorded"] == {"compared": 30, "max_abs_diff": 0.0, "differs": []}
    assert ev["after_task"] == 4 and ev["cil"] == [row[4] for row in recorded.acc["cil"]]


def test_all_as_text_shows_the_matrices_and_the_metrics(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    m = read_results(run / "results.json").metrics["cil"]
    assert lines[1] == "CIL accuracy (%), row: task, column: after task"
    assert lines[3].split()[:3] == ["task", "1", f"{read_results(run / 'results.json').acc['cil'][0][0]:.2f}"]
    assert lines[7].split()[2:] == ["-"] * 4 + [f"{read_results(run / 'results.json').acc['cil'][4][4]:.2f}"]
    assert lines[8] == (f"CIL: final acc {m['final_acc']:.2f}  avg inc acc {m['avg_inc_acc']:.2f}  forgetting "
                        f"{m['forgetting']:.2f}  BWT {m['bwt']:.2f}")
    assert lines[-1] == "results.json: all 30 re-evaluated entries match (max |difference| 0 points)"


def test_a_recorded_entry_that_the_checkpoints_do_not_give_exits_1(run, tmp_path, capsys):
    run = _copy(run, tmp_path)
    r = read_results(run / "results.json")
    was = r.acc["til"][1][3]
    r.set_acc("til", 1, 3, was + 12.5 if was <= 50 else was - 12.5)
    r.refresh_metrics()
    write_results(run / "results.json", r)
    capsys.readouterr()
    assert main(["eval", str(run), "--all"]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (f"results.json: 1 of 30 re-evaluated entries differ, by up to 12.50 points (e.g. TIL task 2 "
                    f"after task 4: {r.acc['til'][1][3]:.2f} recorded, {was:.2f} now)")
    assert main(["eval", str(run)]) == 0  # the last column alone holds no changed entry


def test_a_deleted_checkpoint_leaves_its_column_out(run, tmp_path, capsys):
    run = _copy(run, tmp_path)
    (run / "checkpoints" / "task001.pt").unlink()
    capsys.readouterr()
    assert main(["eval", str(run), "--all", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["missing"] == [1] and ev["metrics"] == {"cil": None, "til": None}
    assert all(row[1] is None for row in ev["acc"]["cil"]) and ev["recorded"]["compared"] == 26  # 30 less column 2 (2 CIL, 2 TIL)
    assert main(["eval", str(run), "--all"]) == 0
    assert "no checkpoint after task(s) 2: those columns and the metrics are left out" in capsys.readouterr().out


def test_without_results_json_the_numbers_are_shown_uncompared(run, tmp_path, capsys):
    run = _copy(run, tmp_path)
    (run / "results.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("after task 5/5") and lines[1].startswith("CIL per task:")
    assert lines[-1].startswith("not compared with results.json: ")
