"""Evaluation with and without the engine's query cache, on the demo presets (real data, shipped backbone).

The engine keeps each test batch's frozen query feature (``Method.frozen_query``) for the whole run, so
an evaluation after task t runs the query pass only for task t's test images. Timed here: one full
evaluation of all 5 tasks (1000 test images), cold (no cache: what every evaluation cost before) and
warm (every query cached: what the evaluation of an old task costs now), round-robin. Also counted:
query passes per run, with and without the cache. The model is untrained (weights do not change the
time), and both paths must give the same accuracies.

    python benchmarks/eval_cache.py --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import tempfile

from _common import (
    add_common_args,
    check_presets,
    finish,
    interleaved,
    med,
    positive_int,
    run_main,
    setup,
    table,
)


def overrides(args: argparse.Namespace) -> list[str]:
    # The Trainer seeds itself from the config, so --seed must reach it as seed=.
    return ["train.progress=false", f"train.device={args.device}", f"seed={args.seed}"]


def measure(preset: str, args: argparse.Namespace) -> dict:
    from pgpcl.config import load_config
    from pgpcl.engine.trainer import Trainer, evaluate_method

    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(load_config(preset, overrides(args)), tmp)
    method, sc, cfg, device = tr.method.eval(), tr.scenario, tr.cfg, tr.device
    last, cache = sc.num_tasks - 1, {}

    def run(query_cache):
        return evaluate_method(method, sc, last, cfg, device, query_cache=query_cache)

    warm, cold = run(cache), run(None)
    assert (warm.cil, warm.til) == (cold.cil, cold.til), "the cache changed accuracies"
    times = interleaved({"no cache": lambda: run(None), "cached": lambda: run(cache)}, args.repeats, 1, args.device)
    tasks = sc.num_tasks
    r = {
        "preset": preset,
        "test_images": sum(len(sc.test_dataset(i)) for i in range(tasks)),
        "seconds": times,
        "median_s": {k: med(v) for k, v in times.items()},
        # evaluations after tasks 0..T-1 read 1 + 2 + ... + T task test sets; cached: each set once
        "task_sets_queried_per_run": {"no cache": tasks * (tasks + 1) // 2, "cached": tasks},
    }
    r["speedup"] = r["median_s"]["no cache"] / r["median_s"]["cached"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--presets", default="demo_l2p_pgp,demo_dualprompt_pgp")
    p.add_argument("--repeats", type=positive_int, default=5)
    args = p.parse_args()
    presets = args.presets.split(",")
    check_presets(presets, overrides(args))
    mach = setup(args)
    results, rows = [], []
    for preset in presets:
        r = measure(preset, args)
        results.append(r)
        q = r["task_sets_queried_per_run"]
        rows.append([preset, r["test_images"], r["median_s"]["no cache"], r["median_s"]["cached"], r["speedup"],
                     f"{q['no cache']} -> {q['cached']}"])
        print(f"done {preset}", flush=True)
    print(table(["preset", "test images", "no cache s", "cached s", "ratio", "task test sets queried per run"],
                rows))
    notes = ["one evaluation = all tasks' test sets after the last task, CIL and TIL",
             "cached = every test batch's query already computed (evaluations of old tasks)"]
    finish("eval_cache", args, mach, results, notes)


if __name__ == "__main__":
    run_main(main)
