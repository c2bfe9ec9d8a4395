"""What PGP buys on the offline demo for each eps and target: the table of docs/pgp.md section 6.

Runs one ``pgpcl demo --methods LEARNER`` per learner and setting (each with its own baselines, so
every difference is paired by seed within one demo), then reads each demo's ``report/summary.json``.
An accuracy sweep, not a timing: the numbers do not depend on the machine's load.

    python benchmarks/eps_sweep.py                      # the five settings of the table, 3 seeds (~20 min)
    python benchmarks/eps_sweep.py --settings 0.5:update --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import HERE, ROOT, child_failure, comma_list, nonneg_int, run_main, write_sweep

# The eps each learner's protected prompts take (L2P's key eps stays at its preset's 0.97).
EPS_KEY = {"l2p": "prompt", "dualprompt": "prefix"}
DEFAULT_SETTINGS = "0.5:gradient,0.5:update,0.9:gradient,0.99:gradient,0.99:update"
COLUMNS = [("cil_forgetting", "CIL forgetting"), ("cil_final", "CIL final"), ("til_final", "TIL final")]


def demo_command(learner: str, eps: str, target: str, out: Path, seeds: list[str]) -> list[str]:
    return [sys.executable, "-m", "pgpcl", "demo", "--methods", learner, "--out", str(out),
            f"pgp.eps.{EPS_KEY[learner]}={eps}", f"pgp.target={target}", "train.progress=false", "--seeds", *seeds]


def run_demo(cmd: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise child_failure(" ".join(cmd[2:6]), proc)
    return json.loads((Path(cmd[cmd.index("--out") + 1]) / "report" / "summary.json").read_text())


def read_summary(summary: dict, learner: str) -> dict:
    """Paired PGP - baseline metrics, and the first protected group's final rank and mean task leak."""
    paired = summary["paired"][0]["metrics"]
    pgp_group = next(g for g in summary["groups"] if g["pgp"])
    first = pgp_group["pgp_subspaces"][0]
    row = {k: {"mean": paired[k]["mean"], "std": paired[k]["std"]} for k, _ in COLUMNS}
    row.update(group=first["group"], dim=first["dim"], rank=first["rank_after"][-1]["mean"],
               leak=first["leak"]["mean"], learner=learner)
    return row


def cell(m: dict) -> str:
    return f"{m['mean']:+.2f}" + ("" if m["std"] is None else f" +- {m['std']:.2f}")


def table(rows: list[dict]) -> str:
    head = ["eps", "target"] + [f"{lr} {label}" for lr in EPS_KEY for _, label in COLUMNS] + ["L2P rank", "L2P leak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (eps, target) in dict.fromkeys((r["eps"], r["target"]) for r in rows):
        by = {r["learner"]: r for r in rows if (r["eps"], r["target"]) == (eps, target)}
        cells = [eps, target] + [cell(by[lr][k]) if lr in by else "-" for lr in EPS_KEY for k, _ in COLUMNS]
        l2p = by.get("l2p")
        cells += [f"{l2p['rank']:.3g} of {l2p['dim']}", f"{l2p['leak']:.2g}"] if l2p else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings(text: str) -> list[tuple[str, str]]:
    """argparse type: 'EPS:TARGET,...' with EPS in (0, 1] and TARGET gradient or update."""
    out = []
    for part in text.split(","):
        eps, _, target = part.strip().partition(":")
        try:
            ok = 0 < float(eps) <= 1 and target in ("gradient", "update")
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"{part!r} is not EPS:TARGET with EPS in (0, 1] and TARGET gradient "
                                             "or update, e.g. 0.5:update")
        out.append((eps, target))
    return out


def seed(text: str) -> str:
    return str(nonneg_int(text))  # kept as text: it goes on pgpcl demo's command line


def out_path(text: str) -> Path:
    """argparse type: the JSON path, its folder made now, so that a bad path fails before the sweep."""
    out = Path(text)
    if out.is_dir():
        raise argparse.ArgumentTypeError(f"{out} is a folder; give a file path such as {out / 'eps_sweep.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot create {out.parent} ({err.strerror}); choose another path") from None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", type=settings, default=DEFAULT_SETTINGS, help="comma-separated EPS:TARGET pairs")
    p.add_argument("--learners", type=comma_list(EPS_KEY), default="l2p,dualprompt", help=f"from {', '.join(EPS_KEY)}")
    p.add_argument("--seeds", type=seed, nargs="+", default=["0", "1", "2"])
    default_out = HERE / "results" / "eps_sweep.json"
    p.add_argument("--out", type=out_path, default=str(default_out),
                   help=f"JSON path (default: {default_out.relative_to(ROOT)})")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps, target in args.settings:
            for learner in args.learners:
                cmd = demo_command(learner, eps, target, Path(tmp) / f"{learner}_{eps}_{target}", args.seeds)
                print(" ".join(["pgpcl", *cmd[3:]]).replace(tmp, "TMPDIR"), flush=True)
                rows.append({"eps": eps, "target": target, **read_summary(run_demo(cmd), learner)})
    text = table(rows)
    print(text)
    write_sweep(args.out, "eps_sweep", {"seeds": args.seeds, "rows": rows, "table": text})


if __name__ == "__main__":
    run_main(main)
