import json

import numpy as np
import pytest

from pgpcl.config import Config
from pgpcl.engine.results import (
    SCHEMA_VERSION,
    Results,
    ResultsError,
    collect_results,
    find_results,
    new_results,
    package_versions,
    read_results,
    write_results,
)
from pgpcl.errors import PgpclError


def make_results(num_tasks: int = 2, til: bool = True) -> Results:
    cfg = Config(name="demo", seed=3)
    cfg.pgp.enabled = True
    cfg.data.num_tasks = num_tasks
    r = new_results(
        cfg,
        num_tasks=num_tasks,
        class_order=[1, 0, 3, 2][: 2 * num_tasks],
        task_classes=[[2 * t, 2 * t + 1] for t in range(num_tasks)],
        class_names=["a", "b", "c", "d"][: 2 * num_tasks],
        weights={"source": "builtin:tiny", "sha256": "ab" * 32},
        device="cpu",
        eval_til=til,
    )
    return r


def fill(r: Results) -> None:
    r.set_acc("cil", 0, 0, 90.0)
    r.set_acc("cil", 0, 1, 80.0)
    r.set_acc("cil", 1, 1, np.float32(70.0))  # numpy scalars from the engine must serialise
    for i, t, a in [(0, 0, 95.0), (0, 1, 93.0), (1, 1, 91.0)]:
        if r.acc["til"] is not None:
            r.set_acc("til", i, t, a)
    r.add_timing(0, train_s=2.0, eval_s=0.5, basis_s=0.1, steps=10, train_images=160)
    r.add_projection(0, "prompt", rank=3, dim=768, leak=1e-7)


def test_new_results_fields():
    r = make_results()
    assert (r.run_name, r.method, r.pgp, r.setting, r.seed) == ("demo", "l2p", True, "cil", 3)
    assert r.status == "running" and r.schema_version == SCHEMA_VERSION
    assert r.acc["cil"] == [[None, None], [None, None]]
    assert r.metrics["cil"]["num_tasks_done"] == 0
    assert r.config["data"]["num_tasks"] == 2
    d = r.to_dict()
    assert list(d)[0] == "schema_version"
    assert d["weights"] == {"source": "builtin:tiny", "sha256": "ab" * 32}


def test_domain_names_are_written_for_dil_runs_only(tmp_path):
    assert "domain_names" not in make_results().to_dict()
    r = make_results()
    r.domain_names = ["photo", "sketch"]
    fill(r)
    write_results(tmp_path / "results.json", r)
    back = read_results(tmp_path / "results.json")
    assert back.domain_names == ["photo", "sketch"]
    assert list(back.to_dict()).index("domain_names") == list(back.to_dict()).index("class_names") + 1


def test_package_versions():
    v = package_versions()
    assert {"pgpcl", "python", "torch", "numpy"} <= set(v)
    assert all(isinstance(x, str) for x in v.values())


def test_roundtrip(tmp_path):
    r = make_results()
    fill(r)
    r.mark("complete")
    path = tmp_path / "run" / "results.json"
    write_results(path, r)
    back = read_results(path)
    assert back.to_dict() == r.to_dict()
    assert back.metrics["cil"]["final_acc"] == pytest.approx(75.0)
    assert back.metrics["cil"]["forgetting"] == pytest.approx(10.0)
    assert back.metrics["til"]["bwt"] == pytest.approx(-2.0)
    assert back.timings[0]["train_images_per_s"] == pytest.approx(80.0)
    assert back.projection[0]["group"] == "prompt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp files left


def test_stored_metrics_are_recomputed_from_the_matrix_on_read(tmp_path):
    """A results file whose metrics disagree with its acc (hand-edited, or from an older pgpcl) must not
    reach `pgpcl train --resume`'s summary or a report: the matrix is the record, metrics derive from it."""
    r = make_results()
    fill(r)
    path = tmp_path / "results.json"
    write_results(path, r)
    d = json.loads(path.read_text())
    d["metrics"]["cil"]["final_acc"] = 12.0
    d["metrics"]["til"]["forgetting"] = 99.0
    path.write_text(json.dumps(d))
    back = read_results(path)
    assert back.metrics["cil"]["final_acc"] == pytest.approx(75.0)
    assert back.metrics["til"]["forgetting"] == pytest.approx(2.0)


def test_running_file_with_partial_matrix_and_no_til(tmp_path):
    r = make_results(til=False)
    r.set_acc("cil", 0, 0, 50.0)
    path = tmp_path / "results.json"
    write_results(path, r)
    back = read_results(path)
    assert back.acc["til"] is None and back.metrics["til"] is None
    assert back.metrics["cil"]["num_tasks_done"] == 1
    with pytest.raises(KeyError):
        r.set_acc("til", 0, 0, 1.0)


def test_unknown_keys_survive_a_rewrite(tmp_path):
    path = tmp_path / "results.json"
    r = make_results()
    d = r.to_dict()
    d["future_field"] = {"x": 1}
    path.write_text(json.dumps(d))
    back = read_results(path)
    write_results(path, back)
    assert json.loads(path.read_text())["future_field"] == {"x": 1}


def test_write_refuses_nan_and_bad_content(tmp_path):
    r = make_results()
    r.timings.append({"task": 0, "train_s": float("nan")})
    with pytest.raises(ValueError, match="timings\\[0\\].train_s"):
        write_results(tmp_path / "results.json", r)
    r = make_results()
    r.mark("complete")  # nothing evaluated yet
    with pytest.raises(ValueError, match="complete"):
        write_results(tmp_path / "results.json", r)
    assert not list(tmp_path.iterdir())


def _write_dict(tmp_path, d) -> str:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(d))
    return str(path)


def _one_line_error(path, needle):
    with pytest.raises(ResultsError) as e:
        read_results(path)
    msg = str(e.value)
    assert isinstance(e.value, PgpclError)
    assert "\n" not in msg and needle in msg and str(path) in msg
    return msg


def test_corrupt_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"schema_version": 1, "status": "runn')
    msg = _one_line_error(path, "is not valid JSON")
    assert msg.endswith("rerun or restore it")


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.json", "not found")


def test_missing_keys(tmp_path):
    d = make_results().to_dict()
    del d["acc"], d["seed"]
    _one_line_error(_write_dict(tmp_path, d), "missing key(s) seed, acc")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(schema_version=99), "schema_version 99"),
        (lambda d: d.update(status="done"), "status 'done'"),
        (lambda d: d.update(seed="3"), "key 'seed'"),
        (lambda d: d.update(pgp=1), "key 'pgp'"),
        (lambda d: d["acc"].update(cil=[[1.0, None]]), "acc.cil: row 0"),
        (lambda d: d["acc"].update(cil=[[1.0, None], [5.0, None]]), "must be null"),
        (lambda d: d["acc"].update(til=[[1.0]]), "different sizes"),
        (lambda d: d["acc"].update(dil=None), "unknown setting"),
        (lambda d: d.update(task_classes=[[0, 1]]), "task_classes lists 1"),
        (lambda d: d.update(domain_names=["photo"]), "domain_names must be 2 strings"),
        (lambda d: d.update(domain_names="photo,sketch"), "key 'domain_names'"),
        (lambda d: d.update(status="complete"), "status is complete"),
        (lambda d: d.update(timings=[1]), "timings"),
        ([], "top level is a list"),
    ],
)
def test_malformed_content(tmp_path, edit, needle):
    d = make_results().to_dict()
    if callable(edit):
        edit(d)
    else:
        d = edit
    _one_line_error(_write_dict(tmp_path, d), needle)


def test_nan_in_file_is_rejected(tmp_path):
    text = json.dumps(make_results().to_dict()).replace('"device": "cpu"', '"device": "cpu", "x": NaN')
    path = tmp_path / "results.json"
    path.write_text(text)
    _one_line_error(path, "x is not a finite number")


def test_find_and_collect(tmp_path):
    r = make_results()
    run_a, run_b = tmp_path / "runs" / "a", tmp_path / "runs" / "nested" / "b"
    write_results(run_a / "results.json", r)
    write_results(run_b / "results.json", r)
    assert find_results(run_a) == run_a / "results.json"
    assert find_results(run_a / "results.json") == run_a / "results.json"
    with pytest.raises(ResultsError, match="no results.json in"):
        find_results(tmp_path)
    with pytest.raises(ResultsError, match="does not exist"):
        find_results(tmp_path / "missing")
    found = collect_results([tmp_path / "runs", run_a])
    assert found == [(run_a / "results.json").resolve(), (run_b / "results.json").resolve()]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="no results.json under"):
        collect_results([tmp_path / "empty"])


def test_a_run_over_several_datasets_is_labelled_by_its_readers():
    r = make_results()
    r.config["data"]["datasets"] = ["cifar10=/data/c10", "mnist", "image_folder=/data/notmnist/"]
    assert r.dataset == "cifar10+mnist+notmnist"
    r.config["data"]["datasets"] = []
    r.config["data"]["domains"] = ["image_folder=/d/photo", "image_folder=/d/sketch"]
    assert r.dataset == "photo+sketch"
