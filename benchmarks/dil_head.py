"""A diagnostic, not a pgpcl feature: how much of the DIL forgetting of docs/pgp.md section 16 lives in
the shared classifier head.

The DIL stream of ``settings_sweep.py`` (Rotated MNIST-5k, five domains, 80 training images per digit
and domain) is trained once more, every learner with and without PGP, with one change: from the
second task on the head (``method.head``, the linear classifier every ViT learner here has) is frozen,
so it keeps what it learned on the first domain. Everything else trains and is projected as usual.
The script checks that the head really did not move, then prints CIL final accuracy and forgetting
next to the numbers of the same runs with the head trained (from ``--sweep``, the sweep's JSON).

    python benchmarks/dil_head.py                               # 6 learners x 2 x 3 seeds (~12 min)
    python benchmarks/dil_head.py --methods l2p,lora --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import HERE, ROOT, comma_list, run_main, write_sweep
from eps_sweep import out_path, seed
from settings_sweep import LEARNERS, setting_overrides, write_rotated_mnist5k


def freeze_head_after_first_task(method) -> dict:
    """Wrap ``method.begin_task`` (this instance only): from task 1 on the head takes no gradient and
    the optimizer, built after ``begin_task``, does not hold it. Returns where the head's snapshot goes."""
    inner, snapshot = method.begin_task, {}

    def begin_task(task: int) -> None:
        inner(task)
        if task >= 1:
            method.head.requires_grad_(False)
            snapshot.setdefault("head", [p.detach().clone() for p in method.head.parameters()])

    method.begin_task = begin_task
    return snapshot


def train_one(learner: str, pgp: bool, run_seed: str, dil_root: Path, out: Path) -> dict:
    from pgpcl.config import load_config
    from pgpcl.engine.trainer import Trainer

    preset = f"demo_{learner}" + ("_pgp" if pgp else "")
    cfg = load_config(preset, [f"seed={run_seed}", *setting_overrides("dil", dil_root), "train.progress=false"])
    trainer = Trainer(cfg, out)
    snapshot = freeze_head_after_first_task(trainer.method)
    results = trainer.run()
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(trainer.method.head.parameters(), snapshot["head"]))
    if moved != 0.0:
        raise RuntimeError(f"{preset} seed {run_seed}: the frozen head moved by {moved}")
    cil = results.metrics["cil"]
    return {"final": cil["final_acc"], "forgetting": cil["forgetting"]}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else None
    return f"{statistics.mean(values):.2f}" + ("" if std is None else f" +- {std:.2f}")


def trained_head(sweep: dict | None, learner: str, key: str, pgp: bool) -> str:
    """The same runs with the head trained, from the sweep's DIL row (baseline, baseline + paired diff)."""
    row = next((r for r in (sweep or {}).get("rows", []) if r["setting"] == "dil" and r["learner"] == learner), None)
    if row is None:
        return "-"
    m = row[{"final": "cil_final", "forgetting": "cil_forgetting"}[key]]
    base = m["baseline"]["mean"]
    return f"{base + m['diff']['mean']:.2f}" if pgp else f"{base:.2f}"


def table(runs: dict, sweep: dict | None) -> str:
    head = ["learner", "PGP", "n", "CIL forgetting, head frozen", "head trained", "CIL final, head frozen", "head trained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (learner, pgp), rows in runs.items():
        cells = [learner, "yes" if pgp else "no", str(len(rows))]
        for key in ("forgetting", "final"):
            cells += [mean_std([r[key] for r in rows]), trained_head(sweep, learner, key, pgp)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=comma_list(LEARNERS), default=",".join(LEARNERS), help=f"from {', '.join(LEARNERS)}")
    p.add_argument("--seeds", type=seed, nargs="+", default=["0", "1", "2"])
    default_sweep = HERE / "results" / "settings_sweep.json"
    p.add_argument("--sweep", default=str(default_sweep), help="settings_sweep.py's JSON, for the head-trained columns")
    default_out = HERE / "results" / "dil_head.json"
    p.add_argument("--out", type=out_path, default=str(default_out),
                   help=f"JSON path (default: {default_out.relative_to(ROOT)})")
    args = p.parse_args()
    sweep = json.loads(Path(args.sweep).read_text()) if Path(args.sweep).is_file() else None
    runs: dict[tuple[str, bool], list[dict]] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        dil_root = write_rotated_mnist5k(Path(tmp) / "mnist5k_rot")
        for learner in args.methods:
            for pgp in (False, True):
                for s in args.seeds:
                    out = Path(tmp) / f"{learner}{'_pgp' if pgp else ''}" / f"seed{s}"
                    runs.setdefault((learner, pgp), []).append(train_one(learner, pgp, s, dil_root, out))
                    print(f"{learner}{'-PGP' if pgp else ''} seed {s}: {runs[(learner, pgp)][-1]}", flush=True)
    text = table(runs, sweep)
    print(text)
    write_sweep(args.out, "dil_head", {
        "seeds": args.seeds, "runs": {f"{lr}{'-PGP' if pgp else ''}": rows for (lr, pgp), rows in runs.items()},
        "table": text, "wall_s": round(time.time() - started)})


if __name__ == "__main__":
    run_main(main)
