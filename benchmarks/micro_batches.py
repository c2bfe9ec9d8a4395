"""Peak memory and step time of ``train.micro_batches``: one global batch in N pieces.

For each N, a fresh interpreter builds the engine's own ``Trainer`` for a preset (random weights of the
preset's backbone, random images of the preset's size and the preset's batch, so no dataset is read)
and takes ``--steps`` real ``Trainer.train_step`` calls on task 1. Reported per N: the process's peak
RSS minus its RSS just before the first step (what the steps add to the weights and data: activations,
gradients, the optimizer state), the whole process's peak, and the median step time (the first excluded).

    python benchmarks/micro_batches.py                                  # cifar100_10_dualprompt, N = 1, 2, 4
    python benchmarks/micro_batches.py --preset cifar100_10_coda_prompt --micro 1,4,8 --steps 2
    python benchmarks/micro_batches.py --device cuda --preset cifar100_10_coda_prompt   # CUDA: max_memory_allocated
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import (
    add_common_args,
    finish,
    int_at_least,
    maxrss_bytes,
    med,
    mib,
    positive_ints,
    rss_bytes,
    run_case_subprocess,
    run_main,
    setup,
    table,
)


def case(args: argparse.Namespace) -> dict:
    """One N in this process: the numbers of one row."""
    from pgpcl.config import load_config
    from pgpcl.engine.trainer import Trainer

    overrides = ["backbone.weights=null", "data.dataset=mnist5k", "data.num_tasks=5", "data.train_per_class=2",
                 "data.test_per_class=1", "train.progress=false", f"train.micro_batches={args.case}",
                 f"train.device={args.device}", f"train.num_threads={args.threads}"]
    cfg = load_config(args.preset, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "run")
        m, B, size = tr.method, cfg.train.batch_size, cfg.data.img_size
        m.begin_task(0)
        m.train()
        params = m.trainable_parameters()
        opt = torch.optim.Adam(params, lr=1e-3)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(B, cfg.data.channels, size, size, generator=g)
        y = torch.tensor(tr.scenario.task_classes[0])[torch.randint(0, len(tr.scenario.task_classes[0]), (B,), generator=g)]
        t = torch.zeros(B, dtype=torch.long)
        mask = tr.scenario.class_mask(0)
        times = []
        cuda = tr.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(tr.device)
        before = rss_bytes() if not cuda else torch.cuda.memory_allocated(tr.device)
        for s in range(args.steps):
            t0 = time.perf_counter()
            tr.train_step(x, y, t, mask.to(tr.device), opt, params, task=0, step=s + 1)
            if cuda:
                torch.cuda.synchronize(tr.device)
            times.append(time.perf_counter() - t0)
        peak = maxrss_bytes() if not cuda else torch.cuda.max_memory_allocated(tr.device)
    return {"micro_batches": args.case, "batch": B, "img_size": size, "arch": cfg.backbone.arch,
            "step_s": med(times[1:]), "peak_mib": mib(peak), "resident_before_steps_mib": mib(before),
            "step_peak_over_resident_mib": mib(peak - before),
            "memory": "cuda max_memory_allocated" if cuda else "cpu VmHWM"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--preset", default="cifar100_10_dualprompt")
    p.add_argument("--micro", type=positive_ints, default=[1, 2, 4], help="comma list of N (default: 1,2,4)")
    p.add_argument("--steps", type=int_at_least(2), default=3, help="steps per N; the first is not timed")
    p.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    mach = setup(args)
    if args.case is not None:
        print(json.dumps(case(args)))
        return
    rows = []
    for n in args.micro:
        argv = [*sys.argv[1:], "--case", str(n), "--threads", str(args.threads)]
        rows.append(run_case_subprocess(Path(__file__), argv))
        r = rows[-1]
        print(f"micro_batches={n}: step {r['step_s']:.2f} s, step peak over resident {r['step_peak_over_resident_mib']:.0f} MiB")
    base = rows[0]
    print(table(["N", "batch", "step s", "x step of N=1", "peak MiB", "step peak over resident MiB", "x of N=1"],
          [[r["micro_batches"], r["batch"], f"{r['step_s']:.2f}", f"{r['step_s'] / base['step_s']:.2f}",
            f"{r['peak_mib']:.0f}", f"{r['step_peak_over_resident_mib']:.0f}",
            f"{r['step_peak_over_resident_mib'] / base['step_peak_over_resident_mib']:.2f}"] for r in rows]))
    finish("micro_batches", args, mach, rows, [f"preset {args.preset}, random weights and images"])


if __name__ == "__main__":
    run_main(main)
