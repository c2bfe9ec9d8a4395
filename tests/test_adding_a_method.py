"""docs/adding-a-method.md, run as written: its method, saved as the module the guide names, trains two
tasks with PGP (basis, projection, results) from Python and from the shell commands it gives, pairs
with its baseline in the report, resumes and re-evaluates."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgpcl.cli import main
from pgpcl.config import load_config
from pgpcl.engine.results import read_results
from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adding-a-method.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    """A folder holding the guide's method as shared_prompt_method.py and its preset, on sys.path."""
    folder = tmp_path_factory.mktemp("guide")
    method_code, run_code = blocks("python")
    (folder / "shared_prompt_method.py").write_text(method_code)
    (preset,) = blocks("yaml")
    (folder / "tiny_shared_prompt_pgp.yaml").write_text(preset)
    sys.path.insert(0, str(folder))
    yield folder, run_code
    sys.path.remove(str(folder))
    sys.modules.pop("shared_prompt_method", None)
    METHODS._items.pop("shared_prompt", None)  # registered for this module's tests only


def test_guide_method_trains_with_pgp_from_python(guide, tmp_path, capsys):
    folder, run_code = guide
    preset_path, out_dir = folder / "tiny_shared_prompt_pgp.yaml", tmp_path / "runs"
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
    # only the prompt and the head train: the checkpoint holds just them, the backbone is rebuilt
    from pgpcl.engine.checkpoint import load_checkpoint

    assert sorted(load_checkpoint(run_dir / "checkpoints" / "task001.pt")["method"]) == [
        "head.bias", "head.weight", "prompt"]

    # the baseline is one override away, and the report pairs the two and shows the prompt's subspace
    args = ["train.progress=false", f"output_dir={out_dir}", "pgp.enabled=false", "name=tiny_shared_prompt"]
    assert main(["train", str(preset_path), *args]) == 0
    capsys.readouterr()
    assert main(["report", str(out_dir), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "shared_prompt-PGP" in text.split("PGP - baseline")[1]
    assert any(line.split()[3:5] == ["prompt", "32"] for line in text.split("PGP subspaces")[1].splitlines()[2:])

    # resume (a finished run comes back as it is) and re-evaluation from Python
    from pgpcl.engine.evaluate import evaluate_run
    from pgpcl.engine.trainer import train

    cfg = load_config(str(preset_path), ["train.progress=false", f"output_dir={out_dir}"])
    assert train(cfg, run_dir, resume=True).metrics == r.metrics
    lines = evaluate_run(run_dir)
    assert lines[0].endswith("after task 2/2") and f"mean {r.metrics['cil']['final_acc']:.2f}" in lines[1]


def test_guide_shell_commands(guide, tmp_path):
    """The guide's two shell lines, each in a fresh interpreter that knows the method only through
    ``imports`` (the second one from the run's config.yaml)."""
    folder, _ = guide
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([".", str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    commands = [line for line in blocks("bash")[0].splitlines() if line.strip()]
    assert commands == ["PYTHONPATH=. pgpcl train tiny_shared_prompt_pgp.yaml",
                        "PYTHONPATH=. pgpcl eval runs/tiny_shared_prompt_pgp/seed0"]
    def run(line: str, *extra: str) -> str:
        argv = line.split()[2:]  # after "PYTHONPATH=. pgpcl"
        proc = subprocess.run([sys.executable, "-m", "pgpcl", *argv, *extra], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    run(commands[0], "train.progress=false")
    assert "CIL per task" in run(commands[1])
    r = read_results(folder / "runs" / "tiny_shared_prompt_pgp" / "seed0" / "results.json")
    assert r.status == "complete" and r.config["imports"] == ["shared_prompt_method"]
    # the baseline and the report, as the guide shows them
    baseline, report = [line for line in blocks("bash")[1].splitlines() if line.strip()]
    assert baseline.endswith("pgp.enabled=false name=tiny_shared_prompt") and report.endswith("report runs")
    run(baseline, "train.progress=false")
    assert "shared_prompt-PGP" in run(report, "--no-plots").split("PGP - baseline")[1]


def test_guide_method_in_reference_mode_is_refused_before_training(guide, tmp_path, capsys):
    folder, _ = guide
    path = str(folder / "tiny_shared_prompt_pgp.yaml")
    argv = ["train", path, "pgp.mode=reference", "pgp.num_samples=32", f"output_dir={tmp_path}", "train.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "reduces group 'prompt''s extra rows (its prompt tokens) to 5 PCA components, but it has 4" in err
    assert "method.length=5" in err and not list(tmp_path.rglob("*.pt"))
    assert main([*argv, "method.length=5", "name=five"]) == 0
    with pytest.raises(ConfigError, match="method.length must be >= 1, got 0"):
        load_config(path, ["method.length=0"])
    with pytest.raises(ConfigError, match="method.prompt_init"):
        load_config(path, ["method.prompt_init=nonsense"])


def test_guide_preset_rejects_unknown_keys_and_modules(guide, tmp_path):
    folder, _ = guide
    path = folder / "tiny_shared_prompt_pgp.yaml"
    with pytest.raises(ConfigError, match=r"did you mean 'method.length'"):
        load_config(str(path), ["method.lenght=8"])
    assert load_config(str(path), ["method.length=8"]).method.params.length == 8
    with pytest.raises(ConfigError, match=r"imports: cannot import 'no_such_module_xyz' .*PYTHONPATH"):
        load_config(str(path), ["imports=[no_such_module_xyz]"])
    with pytest.raises(ConfigError, match=r"unknown method 'no_such_method'.*list its module under imports"):
        load_config(str(path), ["method.name=no_such_method", "method.length=2"])


def test_registering_a_method_whose_params_cannot_be_rebuilt_fails_at_import():
    from dataclasses import dataclass

    from pgpcl.methods import Method

    class NoParams(Method):
        pass

    @dataclass
    class Bare:
        length: int  # resume, eval and reports rebuild the config over Params(): it needs a default

    class NoDefault(Method):
        Params = Bare

    with pytest.raises(TypeError, match="NoParams.Params must be a dataclass"):
        METHODS.register("no_params_here")(NoParams)
    with pytest.raises(TypeError, match="NoDefault.Params.length has no default; give every field one"):
        METHODS.register("no_default_here")(NoDefault)
    assert "no_params_here" not in METHODS and "no_default_here" not in METHODS


def test_a_kind_without_eps_is_a_config_error_not_a_key_error():
    from types import SimpleNamespace

    import torch

    from pgpcl.config import PGPConfig
    from pgpcl.engine.pgp_hooks import PGPHooks
    from pgpcl.projection import ProtectedGroup

    prompt = torch.nn.Parameter(torch.zeros(3, 4))
    method = SimpleNamespace(default_eps={}, protected_groups=lambda eps: [
        ProtectedGroup("prompt", "prompt", prompt, eps=eps["prompt"])])  # a method reading its own eps
    with pytest.raises(ConfigError) as e:
        PGPHooks(method, PGPConfig(enabled=True), torch.device("cpu"))
    assert str(e.value) == "no eps for protected group kind 'prompt'; set pgp.eps.prompt=<value in (0, 1]>"


def test_representations_of_the_wrong_width_are_refused_before_the_first_task_trains(guide, tmp_path, monkeypatch):
    """A shape bug in a method's representations() used to surface at the first basis pass: after a whole
    task for a method that builds its basis at the task's end."""
    import shared_prompt_method  # noqa: F401  (registers the guide's method)
    import torch

    from pgpcl.engine.trainer import Trainer

    cls = METHODS.get("shared_prompt")
    real = cls.representations
    monkeypatch.setattr(cls, "representations", lambda self, x, t: {k: v[..., :16] for k, v in real(self, x, t).items()})
    steps = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, *a, **k: steps.append(1) or (torch.tensor(0.0), 0))
    folder, _ = guide
    cfg = load_config(str(folder / "tiny_shared_prompt_pgp.yaml"), ["train.progress=false"])
    with pytest.raises(ValueError, match=r"SharedPrompt.representations\(\) gave group 'prompt' rows of shape "
                                         r"\(4, \d+, 16\) for a batch of 4; give \(B, n, 32\) or \(B, 32\)"):
        Trainer(cfg, tmp_path / "run").run()
    assert steps == []  # no training step was taken
