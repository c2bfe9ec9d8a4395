"""Where a tiny preset's first basis pass spends more than later ones, and what the block update saves.

First calls are per process, so each first-call case runs in a fresh interpreter (``--case``), several
times; the table gives medians over those processes.

- ``basis``: a tiny preset's ``Trainer`` after its set-up (``_warm_up``), then ``_build_basis(0)``
  three times: the first pass against the warm ones, with its parts (representation forward, memory
  update) timed separately.
- ``eigh``: the process's first ``torch.linalg.eigh`` of a D x D matrix against the second, at D = 32
  and 96 (after a matmul has loaded BLAS).
- minor page faults (``ru_minflt``) of each part, first pass against later ones, and what one costs
  here: filling a fresh 8 MB tensor (its pages are faulted in) against filling it again.
- ``update`` (in this process, warm): one ``grow_basis`` with the block orthonormalisation against the
  column-by-column loop, medians of many calls.

    python benchmarks/first_calls.py --threads 1

Every part is timed with ``--clock`` (wall by default), in the fresh processes too. First calls here are
CPU ones (LAPACK, page faults), so ``--device`` takes cpu only.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from _common import (
    add_common_args,
    check_presets,
    clock,
    finish,
    med,
    positive_int,
    run_case_subprocess,
    run_main,
    setup,
    table,
)


def basis_overrides(seed: int) -> list[str]:
    # train.device=cpu: the presets' own "auto" would take a GPU where there is one.
    return ["train.progress=false", "train.device=cpu", f"seed={seed}"]


def case_basis(preset: str, seed: int) -> dict:
    import torch

    from pgpcl.config import load_config
    from pgpcl.engine.trainer import Trainer
    from pgpcl.projection.pgp import PGP

    parts: dict[str, list[float]] = {"reps": [], "update": [], "reps_faults": [], "update_faults": []}
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(load_config(preset, basis_overrides(seed)), Path(tmp) / "run")
        method = tr.method
        reps, build = method.representations, PGP.build

        def timed_reps(*a, **k):
            f, t = minor_faults(), clock()
            out = reps(*a, **k)
            parts["reps"].append(clock() - t)
            parts["reps_faults"].append(minor_faults() - f)
            return out

        def timed_build(self):
            f, t = minor_faults(), clock()
            out = build(self)
            parts["update"].append(clock() - t)
            parts["update_faults"].append(minor_faults() - f)
            return out

        method.representations, PGP.build = timed_reps, timed_build
        tr._warm_up()
        method.begin_task(0)
        passes, faults = [], []
        with torch.no_grad():
            for _ in range(3):
                f, t = minor_faults(), clock()
                tr._build_basis(0)
                passes.append(clock() - t)
                faults.append(minor_faults() - f)
    return {"pass_s": passes, "reps_s": parts["reps"], "update_s": parts["update"], "pass_faults": faults,
            "reps_faults": parts["reps_faults"], "update_faults": parts["update_faults"]}


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fault_cost_us() -> float:
    """Microseconds per minor page fault: fill a fresh 8 MB tensor (every page faulted in on first
    touch) minus the fastest of three fills again (pages resident; the fastest, so one preempted
    refill cannot make the difference negative), divided by the faults counted."""
    import mmap

    import torch

    # An anonymous mapping of its own: fresh pages on every call (a torch.empty may reuse heap
    # memory that an earlier call left resident, and then faults nothing).
    region = mmap.mmap(-1, 8 << 20)
    t = torch.frombuffer(region, dtype=torch.float32)
    f, start = minor_faults(), clock()
    t.fill_(1.0)
    first, faults = clock() - start, minor_faults() - f
    again = []
    for v in (2.0, 3.0, 4.0):
        start = clock()
        t.fill_(v)
        again.append(clock() - start)
    del t
    region.close()
    if faults == 0:
        raise RuntimeError("the fresh 8 MB mapping faulted in no pages; cannot measure a fault here")
    return 1e6 * (first - min(again)) / faults


def case_eigh() -> dict:
    import torch

    torch.randn(64, 64) @ torch.randn(64, 64)
    out = {}
    for d in (32, 96):
        a = torch.randn(d, d, dtype=torch.float64)
        a = a @ a.T
        times = []
        for _ in range(2):
            t = clock()
            torch.linalg.eigh(a)
            times.append(clock() - t)
        out[str(d)] = times
    return out


def fresh(argv: list[str], args: argparse.Namespace) -> dict:
    common = ["--threads", str(args.threads), "--clock", args.clock, "--seed", str(args.seed)]
    return run_case_subprocess(Path(__file__), [*common, *argv], timeout=600)


def update_times(calls: int) -> list[list]:
    import torch

    from pgpcl.projection import linalg

    rows, block = [], linalg._extend_block
    for d in (32, 96):
        g = torch.Generator().manual_seed(d)
        x = torch.randn(20 * d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
        gram, empty = x.T @ x, torch.zeros(d, 0, dtype=torch.float64)
        for eps in (0.5, 0.97):
            res = {}
            for name, fn in (("block", block), ("loop", lambda b, n: None)):
                linalg._extend_block = fn
                linalg.grow_basis(empty, gram, eps)
                ts = []
                for _ in range(calls):
                    t = clock()
                    basis, _, _ = linalg.grow_basis(empty, gram, eps)
                    ts.append(clock() - t)
                res[name] = (med(ts), basis.shape[1])
            linalg._extend_block = block
            rows.append([d, eps, res["block"][1], 1e3 * res["loop"][0], 1e3 * res["block"][0]])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--case", choices=["basis", "eigh"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--presets", default="tiny_l2p_pgp,tiny_dualprompt_pgp")
    p.add_argument("--processes", type=positive_int, default=5, help="fresh processes per first-call case")
    args = p.parse_args()
    if args.device != "cpu":
        p.error("first calls are measured on the CPU (LAPACK, page faults); drop --device or give --device cpu")
    mach = setup(args)
    if args.case is not None:
        print(json.dumps(case_basis(args.preset, args.seed) if args.case == "basis" else case_eigh()))
        return
    presets = args.presets.split(",")
    check_presets(presets, basis_overrides(args.seed), need_pgp=True)
    ms = 1e3
    results: dict = {"basis": {}, "eigh": [], "update": None}
    rows = []
    for preset in presets:
        runs = [fresh(["--case", "basis", "--preset", preset], args) for _ in range(args.processes)]
        results["basis"][preset] = runs
        for key in ("pass", "reps", "update"):
            first = med(r[key + "_s"][0] for r in runs)
            warm = med(v for r in runs for v in r[key + "_s"][1:])
            f_first = med(r[key + "_faults"][0] for r in runs)
            f_warm = med(v for r in runs for v in r[key + "_faults"][1:])
            rows.append([preset, key, ms * first, ms * warm, ms * (first - warm), f_first, f_warm])
        print(f"done {preset}", flush=True)
    print(table(["preset", "part", "first pass ms", "later passes ms", "extra ms", "faults first", "faults later"],
                rows))
    cost = med(fault_cost_us() for _ in range(args.processes))
    results["fault_cost_us"] = cost
    print(f"one minor page fault costs {cost:.2f} us here (fresh 8 MB fill minus the fastest of three refills, median of "
          f"{args.processes})")
    eigh = [fresh(["--case", "eigh"], args) for _ in range(args.processes)]
    results["eigh"] = eigh
    erows = [[d, ms * med(r[d][0] for r in eigh), ms * med(r[d][1] for r in eigh)] for d in ("32", "96")]
    print(table(["D", "first eigh ms", "second eigh ms"], erows))
    urows = update_times(200)
    results["update"] = urows
    print(table(["D", "eps", "rank", "loop ms", "block ms"], urows))
    notes = [
        "basis: medians over fresh processes; first pass = the process's first _build_basis after set-up",
        "eigh: the process's first call of a size against its second (medians over fresh processes)",
        "update: one grow_basis from an empty basis, median of 200 warm calls, block vs column-by-column",
        "faults: minor page faults (getrusage ru_minflt) during the part, medians over the processes",
    ]
    finish("first_calls", args, mach, results, notes)


if __name__ == "__main__":
    run_main(main)
