"""Wall time of the offline demo (``pgpcl demo``), end to end in a fresh process.

Skips with a message when this pgpcl has no ``demo`` subcommand. Default: ``--quick`` (one seed,
fewer images, the documented under-a-minute path); ``--full`` times the default demo (3 seeds x 4
learners, minutes). Each run writes into a fresh temporary folder, so nothing is reused.

    python benchmarks/demo.py
    python benchmarks/demo.py --full
    python benchmarks/demo.py --full --methods all     # the four learner pairs of pgpcl demo --methods all
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, add_common_args, finish, setup


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
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    shown = ["pgpcl", "demo", "--out", "TMPDIR", *cmd[6:]]
    return {"command": " ".join(shown), "wall_s": wall, "omp_num_threads": env.get("OMP_NUM_THREADS"),
            "stdout_tail": proc.stdout[-1500:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--full", action="store_true", help="time the default demo instead of --quick")
    p.add_argument("--omp-threads", type=int, default=None, help="OMP_NUM_THREADS for the demo process")
    p.add_argument("--methods", default=None, help="passed to pgpcl demo --methods (default: the demo's own)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides passed to pgpcl demo")
    args = p.parse_args()
    mach = setup(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    if not has_demo(env):
        print("skipped: this pgpcl has no 'demo' subcommand (pgpcl demo --help failed); nothing was timed")
        finish("demo", args, mach, {"skipped": True}, ["no pgpcl demo subcommand"])
        return
    extra = [*(["--methods", args.methods] if args.methods else []), *args.overrides]
    r = time_demo(not args.full, extra, env)
    print(r["stdout_tail"])
    print(f"\n{r['command']}: {r['wall_s']:.1f} s wall")
    finish("demo", args, mach, r, ["wall time of the whole process: start-up, training, evaluation, report"])


if __name__ == "__main__":
    main()
