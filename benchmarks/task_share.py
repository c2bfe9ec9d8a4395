"""Basis building as a share of task time, from real ``pgpcl train`` runs (results.json timings).

Runs each preset end to end in a fresh process (``python -m pgpcl train PRESET train.progress=false``)
and reads ``timings`` of its results.json: per task ``basis_s`` (PGP representation pass + basis
update), ``train_s`` (steps, data loading and the end-of-training checkpoint), ``eval_s`` and
``setup_s`` (the process's one-off set-up, on the first task). Reports basis_s / train_s per task and
over the run, and the set-up beside them.

For the released ViT-B/16 configs (768 samples, thousands of steps per task) a full task is hours on
a CPU, so the last table is *computed* from per-image times measured by ``benchmarks/train.py`` and
``benchmarks/basis.py`` (their JSON in benchmarks/results/), labelled as such.

    python benchmarks/task_share.py                                  # tiny presets + demo presets
    python benchmarks/task_share.py --presets tiny_l2p_pgp --omp-threads 1

``--threads``, ``--device`` and ``--seed`` reach every run as ``train.num_threads=``, ``train.device=``
and ``seed=`` overrides; left out, each run keeps its preset's (and torch's default threads). The
timings are the engine's wall clock, so there is no ``--clock``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    RESULTS,
    ROOT,
    ChildFailed,
    add_child_args,
    check_presets,
    child_failure,
    child_overrides,
    finish,
    positive_int,
    refuse_owned,
    run_main,
    setup_children,
    table,
)

# Released 10-split CIFAR-100 ViT-B/16 configs (design note, section 4): 5000 train images per task.
RELEASED = {
    "l2p": {"images_per_task": 5000, "epochs": 5, "batch": 16, "samples": 768},
    "dualprompt": {"images_per_task": 5000, "epochs": 20, "batch": 24, "samples": 768},
}


def child_env(src: Path, omp_threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    if omp_threads:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    return env


def baseline_src(text: str) -> Path:
    """argparse type: a folder that holds a pgpcl package."""
    src = Path(text).expanduser().resolve()
    if not (src / "pgpcl" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{src} holds no pgpcl/__init__.py; give the src folder of a pgpcl "
                                         "checkout (e.g. /tmp/oldtree/src)")
    return src


def imported_from(src: Path, omp_threads: int | None) -> str:
    """The pgpcl a child started like the timed ones imports; refuses one not from ``src``, since
    otherwise an A/B would silently time the same code twice (PYTHONPATH falls through to an installed
    pgpcl)."""
    cmd = [sys.executable, "-c", "import pgpcl; print(pgpcl.__file__)"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(src, omp_threads))
    if proc.returncode != 0:
        raise child_failure(f"import pgpcl from {src}", proc)
    found = Path(proc.stdout.strip()).resolve()
    if not found.is_relative_to(src):
        raise ChildFailed(f"a child with {src} first on PYTHONPATH imports pgpcl from {found}; run from a "
                          "folder that holds no pgpcl package")
    return str(found)


def run_preset(preset: str, overrides: list[str], omp_threads: int | None, src: Path = ROOT / "src") -> dict:
    env = child_env(src, omp_threads)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pgpcl", "train", preset, "train.progress=false", *overrides,
               "--run-dir", str(Path(tmp) / "run"), "--overwrite"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise child_failure(f"pgpcl train {preset}", proc)
        res = json.loads((Path(tmp) / "run" / "results.json").read_text())
    timings = res["timings"]
    basis = sum(t["basis_s"] for t in timings)
    train = sum(t["train_s"] for t in timings)
    evals = sum(t["eval_s"] for t in timings)
    setup = sum(t.get("setup_s", 0.0) for t in timings)
    ckpt = sum(t.get("checkpoint_s", 0.0) for t in timings)
    return {
        "preset": preset,
        "overrides": overrides,
        "wall_s": wall,
        "timings": timings,
        "basis_s": basis,
        "train_s": train,
        "eval_s": evals,
        "setup_s": setup,
        "basis_pct_of_train": 100 * basis / train,
        "checkpoint_s": ckpt,
        "basis_pct_of_train_without_checkpoints": 100 * basis / (train - ckpt),
        "basis_pct_of_task": 100 * basis / (basis + train + evals),
        "max_task_basis_pct_of_train": max(100 * t["basis_s"] / t["train_s"] for t in timings),
        "task_basis_pct_of_train": [100 * t["basis_s"] / t["train_s"] for t in timings],
    }


def projected_released() -> list[dict]:
    """Released ViT-B/16 task: basis share computed from the measured per-image times (if present)."""
    try:
        train = json.loads((RESULTS / "train.json").read_text())
        basis = json.loads((RESULTS / "basis.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for method, cfg in RELEASED.items():
        steps = [r for r in train["results"] if r["model"] == "ViT-B/16" and r["method"] == method]
        cases = [r for r in basis["results"]["cases"] if r["model"] == "ViT-B/16" and r["method"] == method]
        if not steps or not cases:
            continue
        s, c = steps[0], max(cases, key=lambda r: r["samples"])
        per_image = s["median_step_s"]["pgpcl+pgp"] / s["batch"]
        n_steps = cfg["epochs"] * math.ceil(cfg["images_per_task"] / cfg["batch"])
        train_s = per_image * cfg["batch"] * n_steps
        row = {"method": method, "measured_batch": s["batch"], "steps_per_task": n_steps,
               "train_s_computed": train_s, "clock": train["args"].get("clock")}
        for path, per_sample in c["seconds_per_sample"].items():
            row[f"basis_s_{path}"] = per_sample * cfg["samples"]
            row[f"basis_pct_{path}"] = 100 * per_sample * cfg["samples"] / train_s
        out.append(row)
    return out


def summarize(reps: list[dict]) -> tuple[dict, list]:
    """The run with the median basis share stands for the preset (every run is kept in the JSON), and
    its table row."""
    r = sorted(reps, key=lambda v: v["basis_pct_of_train"])[len(reps) // 2]
    keep = ("basis_pct_of_train", "basis_pct_of_train_without_checkpoints", "max_task_basis_pct_of_train",
            "task_basis_pct_of_train", "basis_s", "train_s", "setup_s", "timings")
    r = {**r, "repeats": [{k: v[k] for k in keep} for v in reps]}
    shares = sorted(v["basis_pct_of_train"] for v in reps)
    per_task = [sorted(v["task_basis_pct_of_train"][i] for v in reps) for i in range(len(r["timings"]))]
    row = [r["preset"], len(r["timings"]), r["train_s"], r["basis_s"], r["eval_s"], r["setup_s"],
           r["basis_pct_of_train"], f"{shares[0]:.3g}-{shares[-1]:.3g}",
           " / ".join(f"{p[len(p) // 2]:.3g}" for p in per_task),
           r["basis_pct_of_train_without_checkpoints"], r["wall_s"]]
    return r, row


def print_projected(projected: list[dict]) -> None:
    if not projected:
        return
    print("\nreleased ViT-B/16 10-split CIFAR-100 task, COMPUTED from measured per-image times "
          "(benchmarks/results/train.json, basis.json):")
    prow = [[r["method"], r["steps_per_task"], r["train_s_computed"], r.get("basis_s_pgpcl"),
             r.get("basis_pct_pgpcl"), r.get("basis_pct_reference")] for r in projected]
    print(table(["method", "steps/task", "train s", "basis s", "basis % (pgpcl)", "basis % (ref)"], prow))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_child_args(p)
    p.add_argument("--presets", default="tiny_l2p_pgp,tiny_dualprompt_pgp,demo_l2p_pgp,demo_dualprompt_pgp")
    p.add_argument("--repeats", type=positive_int, default=1, help="runs per preset; the median run is reported")
    p.add_argument("--omp-threads", type=positive_int, default=None,
                   help="OMP_NUM_THREADS for the runs (default: unset)")
    p.add_argument("--baseline-src", type=baseline_src, default=None,
                   help="also run every repeat with the pgpcl sources in this folder (e.g. a `git worktree` of an "
                        "older commit), interleaved with this tree's, and report both: an A/B of two code "
                        "versions under the same machine load")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = p.parse_args()
    refuse_owned(p, args.overrides, args)
    presets = args.presets.split(",")
    overrides = [*args.overrides, *child_overrides(args)]
    check_presets(presets, overrides)
    mach = setup_children(args)
    versions = {"this tree": ROOT / "src"}
    if args.baseline_src is not None:
        versions = {"baseline": args.baseline_src, **versions}
    imported = {v: imported_from(src, args.omp_threads) for v, src in versions.items()}
    results, rows = [], []
    for preset in presets:
        reps: dict[str, list[dict]] = {v: [] for v in versions}
        for _ in range(args.repeats):
            for version, src in versions.items():
                reps[version].append(run_preset(preset, overrides, args.omp_threads, src))
        for version, runs in reps.items():
            r, row = summarize(runs)
            results.append({**r, "sources": str(versions[version]), "pgpcl_imported_from": imported[version]})
            rows.append(row if len(versions) == 1 else [version, *row])
        print(f"done {preset}", flush=True)
    head = ["preset", "tasks", "train s", "basis s", "eval s", "setup s", "basis % of train (median run)",
            "range over runs", "per task % (medians)", "% of train minus checkpoints", "wall s"]
    print(table(head if len(versions) == 1 else ["sources", *head], rows))
    projected = projected_released()
    print_projected(projected)
    notes = [
        "basis % of train = sum of basis_s / sum of train_s over the run's tasks (results.json timings)",
        "per task % = each task's basis_s / train_s, the median over the runs",
        "setup s = the process's one-off set-up before its first task (results.json setup_s), in no phase",
        "% of train minus checkpoints = basis_s / (train_s - checkpoint_s): against the steps and data alone",
        "times are the engine's wall-clock timings (time.perf_counter) in results.json",
    ]
    finish("task_share", args, mach, {"runs": results, "projected_released_vit_b": projected}, notes)


if __name__ == "__main__":
    run_main(main)
