"""docs/adding-a-method.md, run as written: its method registers, trains two tasks with PGP through the
engine (basis, projection, results), pairs with its baseline in the report, and resumes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.engine.results import read_results
from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def guide_method():
    method_code, run_code = blocks("python")
    namespace: dict = {}
    exec(compile(method_code, str(GUIDE), "exec"), namespace)
    yield namespace, run_code
    METHODS._items.pop("shared_prompt", None)  # the guide's registration is for this module only


def test_guide_method_trains_with_pgp(guide_method, tmp_path, capsys):
    _, run_code = guide_method
    (preset,) = blocks("yaml")
    preset_path = tmp_path / "tiny_shared_prompt_pgp.yaml"
    preset_path.write_text(preset)
    out_dir = tmp_path / "runs"
    exec(compile(run_code, str(GUIDE), "exec"), {"preset_path": str(preset_path), "out_dir": str(out_dir)})
    printed = capsys.readouterr().out.split()
    run_dir = out_dir / "tiny_shared_prompt_pgp" / "seed0"
    r = read_results(run_dir / "results.json")
    assert r.status == "complete" and r.method == "shared_prompt" and r.pgp
    assert float(printed[0]) == pytest.approx(r.metrics["cil"]["final_acc"])
    assert [p["group"] for p in r.projection] == ["prompt"] and printed[1:] == ["['prompt']"]
    basis = r.extra["basis"]
    assert [b["task"] for b in basis] == [0, 1] and 0 < basis[0]["rank_after"] <= basis[0]["dim"] == 32
    assert r.projection[0]["leak"] is not None and r.projection[0]["rank"] == basis[0]["rank_after"]

    # the baseline is one override away, and the report pairs the two and shows the prompt's subspace
    cfg = ["train.progress=false", f"output_dir={out_dir}", "pgp.enabled=false", "name=tiny_shared_prompt"]
    assert main(["train", str(preset_path), *cfg]) == 0
    capsys.readouterr()
    assert main(["report", str(out_dir), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "shared_prompt-PGP" in text.split("PGP - baseline")[1]
    assert any(line.split()[3:5] == ["prompt", "32"] for line in text.split("PGP subspaces")[1].splitlines()[2:])

    # the Python API the guide names: resume (a finished run is returned as it is) and re-evaluation
    from pgpcl.engine.evaluate import evaluate_run
    from pgpcl.engine.trainer import train

    cfg = load_config(str(preset_path), ["train.progress=false", f"output_dir={out_dir}"])
    assert train(cfg, run_dir, resume=True).metrics == r.metrics
    lines = evaluate_run(run_dir)
    assert lines[0].endswith("after task 2/2") and f"mean {r.metrics['cil']['final_acc']:.2f}" in lines[1]
    # and the pgpcl command, in a process that has imported the method
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "already complete" in capsys.readouterr().out


def test_guide_method_rejects_unknown_keys(guide_method, tmp_path):
    (preset,) = blocks("yaml")
    path = tmp_path / "p.yaml"
    path.write_text(preset)
    with pytest.raises(ConfigError, match=r"did you mean 'method.length'"):
        load_config(str(path), ["method.lenght=8"])
    assert load_config(str(path), ["method.length=8"]).method.params.length == 8
