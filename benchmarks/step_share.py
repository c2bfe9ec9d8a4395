"""Projection cost as a share of a training step, in real engine runs, for every learner with PGP.

For each preset the engine's own ``Trainer`` trains tasks 1 and 2 in this process; on task 2 (the
first projected one) every ``Trainer.train_step`` is timed, and inside it the PGP hooks that run
around the optimizer step (``before_step``: gradient projection and snapshots; ``after_step``: update
projection or step bookkeeping). Reports the median step, the median time in the hooks and their
share, per projection target. Issue #4's budget is "projection under 5% of step time".

    python benchmarks/step_share.py                      # the demo presets of all six ViT learners
    python benchmarks/step_share.py --presets tiny_lora_pgp,tiny_adapter_pgp --targets update
    python benchmarks/step_share.py --presets demo_dualprompt_pgp method.key_basis=head
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import (
    add_common_args,
    check_presets,
    clock,
    comma_list,
    finish,
    med,
    refuse_owned,
    run_main,
    setup,
    table,
)

DEFAULT = "demo_l2p_pgp,demo_dualprompt_pgp,demo_coda_prompt_pgp,demo_lora_pgp,demo_adapter_pgp,demo_prefix_pgp"


def overrides(args: argparse.Namespace, target: str) -> list[str]:
    """The run's overrides; the common options go last, so that they are what the JSON says."""
    return ["train.progress=false", f"pgp.target={target}", *args.overrides, f"train.num_threads={args.threads}",
            f"train.device={args.device}", f"seed={args.seed}"]


def measure(preset: str, target: str, args: argparse.Namespace) -> dict:
    from pgpcl.config import load_config
    from pgpcl.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(load_config(preset, overrides(args, target)), Path(tmp) / "run")
        hooks, steps, current = tr.pgp, [], {"hooks": 0.0}

        def timed(fn):
            def run():
                start = clock()
                fn()
                current["hooks"] += clock() - start
            return run

        hooks.before_step, hooks.after_step = timed(hooks.before_step), timed(hooks.after_step)
        train_step = tr.train_step

        def timed_step(*a, **k):
            current["hooks"], start = 0.0, clock()
            out = train_step(*a, **k)
            if hooks.active:
                steps.append((clock() - start, current["hooks"]))
            return out

        tr.train_step = timed_step
        tr._warm_up()
        tr.run_task(0)
        tr.run_task(1)
        groups = len(hooks.pgp.groups)
    step_s, hook_s = med(s for s, _ in steps), med(h for _, h in steps)
    return {"preset": preset, "target": target, "overrides": overrides(args, target), "groups": groups,
            "steps": len(steps), "median_step_s": step_s, "median_hooks_s": hook_s,
            "hooks_pct_of_step": 100 * med(h / s for s, h in steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--presets", default=DEFAULT)
    p.add_argument("--targets", type=comma_list(["gradient", "update"]), default="gradient,update")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every preset")
    args = p.parse_args()
    refuse_owned(p, args.overrides)
    presets = args.presets.split(",")
    mach = setup(args)  # first: it turns --threads 0 into the thread count the overrides pass on
    for target in args.targets:
        check_presets(presets, overrides(args, target), need_pgp=True)
    results = [measure(preset, target, args) for preset in presets for target in args.targets]
    rows = [[r["preset"], r["target"], r["groups"], r["steps"], 1e3 * r["median_step_s"], 1e3 * r["median_hooks_s"],
             r["hooks_pct_of_step"]] for r in results]
    print(table(["preset", "target", "groups", "projected steps", "step ms (median)", "hooks ms (median)",
                 "hooks % of step (median)"], rows))
    finish("step_share", args, mach, {"runs": results}, [
        "steps of the second task (the first projected one), engine's Trainer.train_step, this process",
        "hooks = PGP before_step + after_step around the optimizer step (projection, snapshots, leak bookkeeping)",
    ])


if __name__ == "__main__":
    run_main(main)
