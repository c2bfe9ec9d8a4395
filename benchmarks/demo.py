"""Wall time of the offline demo (``pgpcl demo``), end to end in a fresh process.

Skips with a message when this pgpcl has no ``demo`` subcommand. Default: ``--quick`` (one seed,
fewer images, the documented under-a-minute path); ``--full`` times the default demo (3 seeds x 4
learners, minutes). Each run writes into a fresh temporary folder, so nothing is reused.

    python benchmarks/demo.py
    python benchmarks/demo.py --full
    python benchmarks/demo.py --full --methods all     # every learner pair (pgpcl.demo.METHODS), +- PGP

``--threads`` and ``--device`` reach every demo run as ``train.num_threads=`` / ``train.device=``
overrides; left out, the demo's own (torch's default threads). The demo picks its runs' seeds itself
(``pgpcl demo --seeds``), so there is no ``--seed``, and the time is the process's wall time, so there
is no ``--clock``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from _common import (
    ROOT,
    add_child_args,
    child_failure,
    child_overrides,
    finish,
    positive_int,
    refuse_owned,
    run_main,
    setup_children,
)


def has_demo(env: dict) -> bool:
    proc = subprocess.run([sys.executable, "-m", "pgpcl", "demo", "--help"], capture_output=True, text=True, env=env)
    return proc.returncode == 0


def time_demo(quick: bool, extra: list[str], env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pgpcl", "demo", "--out", tmp, *(["--quick"] if quick else []), *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise child_failure("pgpcl demo", proc)
    shown = ["pgpcl", "demo", "--out", "TMPDIR", *cmd[6:]]
    return {"command": " ".join(shown), "wall_s": wall, "omp_num_threads": env.get("OMP_NUM_THREADS"),
            "stdout_tail": proc.stdout[-1500:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_child_args(p, seed=False)
    p.add_argument("--full", action="store_true", help="time the default demo instead of --quick")
    p.add_argument("--omp-threads", type=positive_int, default=None, help="OMP_NUM_THREADS for the demo process")
    p.add_argument("--methods", default=None, help="passed to pgpcl demo --methods (default: the demo's own; "
                   "all = every learner pair of pgpcl.demo.METHODS)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides passed to pgpcl demo")
    args = p.parse_args()
    refuse_owned(p, args.overrides, args)
    mach = setup_children(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    if not has_demo(env):
        print("skipped: this pgpcl has no 'demo' subcommand (pgpcl demo --help failed); nothing was timed")
        finish("demo", args, mach, {"skipped": True}, ["no pgpcl demo subcommand"])
        return
    extra = [*(["--methods", args.methods] if args.methods else []), *args.overrides, *child_overrides(args)]
    r = time_demo(not args.full, extra, env)
    print(r["stdout_tail"])
    print(f"\n{r['command']}: {r['wall_s']:.1f} s wall")
    finish("demo", args, mach, r, ["wall time of the whole process: start-up, training, evaluation, report"])


if __name__ == "__main__":
    run_main(main)
