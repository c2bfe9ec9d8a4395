"""``pgpcl eval RUN_DIR [--all] [--json]``: the run's model rebuilt from its checkpoints and evaluated
again, compared with what results.json recorded; ``--all`` rebuilds the whole accuracy matrix and its
metrics from every end-of-task checkpoint. Exit 1 when the re-evaluation and the file disagree, when
the file cannot confirm anything, or when the final checkpoint is gone."""

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


@pytest.mark.parametrize("damage", ["deleted", "truncated", "{}", "[1, 2]"])
def test_without_a_readable_results_json_the_numbers_are_shown_uncompared_and_eval_exits_1(
        run, tmp_path, capsys, damage):
    """Nothing confirmed the numbers, so a script must not read success; the note goes to stderr."""
    run = _copy(run, tmp_path)
    path = run / "results.json"
    if damage == "deleted":
        path.unlink()
    else:
        path.write_text(path.read_text()[:200] if damage == "truncated" else damage)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].endswith("after task 5/5") and lines[1].startswith("CIL per task:")
    assert not any("results.json" in line for line in lines)
    assert captured.err.startswith("pgpcl: eval: not compared with results.json: results file ")
    assert main(["eval", str(run), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["recorded"]["compared"] == 0 and "not compared" in captured.err


def test_a_deleted_final_checkpoint_is_not_called_final(run, tmp_path, capsys):
    run = _copy(run, tmp_path)
    (run / "checkpoints" / "task004.pt").unlink()
    capsys.readouterr()
    assert main(["eval", str(run), "--all", "--json"]) == 1
    ev = json.loads(capsys.readouterr().out)
    assert ev["missing"] == [4] and ev["metrics"] == {"cil": None, "til": None} and ev["after_task"] == 3
    assert main(["eval", str(run), "--all"]) == 1
    out = capsys.readouterr().out
    assert "no checkpoint after task(s) 5: those columns and the metrics are left out" in out
    assert ("results.json records 5 trained tasks but the checkpoint after task 5 is gone: the last one kept is "
            "after task 4, so these are not the run's final numbers") in out
    assert main(["eval", str(run), "--json"]) == 1
    ev = json.loads(capsys.readouterr().out)
    assert ev["missing"] == [4] and ev["after_task"] == 3


def test_a_results_json_of_another_run_is_not_compared(run, tmp_path, capsys):
    """A results.json copied in from a run of another config: its numbers are no check of these checkpoints."""
    run = _copy(run, tmp_path)
    r = read_results(run / "results.json")
    r.config["train"]["lr"] = r.config["train"]["lr"] * 2
    write_results(run / "results.json", r)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 1
    err = capsys.readouterr().err
    assert "is not this run's: its config differs from" in err and "in train.lr (config.yaml has" in err
