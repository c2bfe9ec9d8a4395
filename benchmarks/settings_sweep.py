"""What PGP buys in each continual setting on the offline demo: the table of docs/pgp.md section 16.

One ``pgpcl demo --methods all`` per setting (every learner with and without PGP, the same seeds, so
each difference is paired by seed within one demo), then each demo's ``report/summary.json`` is read.
An accuracy sweep, not a timing: the numbers do not depend on the machine's load.

- ``cil``: the demo as shipped (5 tasks of 2 digits, 2 epochs).
- ``online``: the same stream, ``data.setting=online`` (one pass over each task).
- ``dil``: Rotated MNIST-5k, five domains (the digits turned by 0, 45, 90, 135 and 180 degrees) written
  as an ``image_folder`` (``root/rotNNN/{train,test}/<digit>/*.png``, read by pgpcl's real folder
  reader), ``data.setting=dil``, all 10 digits in every task. 80 training images per digit and domain,
  so that a task holds 800 images like a ``cil`` task; the 100 test images per digit are all kept.
- ``dil_head`` (not in the default run): ``dil`` with ``pgp.protect_head=true``, the shared head
  protected too.

    python benchmarks/settings_sweep.py                          # the three settings, 3 seeds (~24 min)
    python benchmarks/settings_sweep.py --settings dil --methods l2p --seeds 0
    python benchmarks/settings_sweep.py --settings dil_head --out benchmarks/results/settings_sweep_dil_head.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, ROOT, comma_list, run_main, write_sweep
from eps_sweep import out_path, run_demo, seed

SETTINGS = ("cil", "online", "dil", "dil_head")
DEFAULT_SETTINGS = ("cil", "online", "dil")
LEARNERS = ("l2p", "dualprompt", "coda_prompt", "lora", "adapter", "prefix")
ANGLES = (0, 45, 90, 135, 180)
DIL_TRAIN_PER_CLASS = 80
COLUMNS = [("cil_forgetting", "CIL forgetting"), ("cil_final", "CIL final"), ("til_final", "TIL final")]


def write_rotated_mnist5k(root: Path, angles=ANGLES) -> Path:
    """MNIST-5k's train / test split, each digit turned by every angle: one image_folder domain per angle."""
    from PIL import Image

    from pgpcl.data.mnist5k import read_mnist5k

    splits = read_mnist5k(None, False)
    for angle in angles:
        for role, split in (("train", splits.train), ("test", splits.test)):
            for i, (image, label) in enumerate(zip(split.images, split.targets)):
                folder = root / f"rot{angle:03d}" / role / str(int(label))
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).rotate(angle, resample=Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root


def setting_overrides(setting: str, dil_root: Path | None) -> list[str]:
    if setting == "online":
        return ["data.setting=online"]
    if setting in ("dil", "dil_head"):
        head = ["pgp.protect_head=true"] if setting == "dil_head" else []
        return ["data.setting=dil", "data.dataset=image_folder", f"data.root={dil_root}",
                f"data.train_per_class={DIL_TRAIN_PER_CLASS}", *head]
    return []


def demo_summary(learners: list[str], overrides: list[str], out: Path, seeds: list[str]) -> dict:
    return run_demo([sys.executable, "-m", "pgpcl", "demo", "--methods", ",".join(learners), "--out", str(out),
                     *overrides, "train.progress=false", "--seeds", *seeds])


def rows_of(summary: dict, setting: str) -> list[dict]:
    """Per learner: the baseline's metrics and PGP minus baseline, paired by seed."""
    baselines = {g["label"]: g for g in summary["groups"] if not g["pgp"]}
    rows = []
    for pair in summary["paired"]:
        base = baselines[pair["baseline_group"]]
        row = {"setting": setting, "learner": base["method"], "n": pair["metrics"]["cil_final"]["n"]}
        for key, _ in COLUMNS:
            diff, plain = pair["metrics"].get(key), base["metrics"].get(key)
            row[key] = None if diff is None or diff["mean"] is None else {
                "baseline": {"mean": plain["mean"], "std": plain["std"]},
                "diff": {"mean": diff["mean"], "std": diff["std"]},
                "pgp_lower": sum(v < 0 for v in diff["values"]), "values": diff["values"]}
        rows.append(row)
    return rows


def _pm(m: dict, sign: bool) -> str:
    text = f"{m['mean']:+.2f}" if sign else f"{m['mean']:.2f}"
    return text + ("" if m["std"] is None else f" +- {m['std']:.2f}")


def table(rows: list[dict]) -> str:
    head = ["setting", "learner", "n", "CIL forgetting, baseline", "PGP - baseline", "seeds PGP lower",
            "CIL final, baseline", "PGP - baseline", "TIL final, PGP - baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        forget, final, til = r["cil_forgetting"], r["cil_final"], r["til_final"]
        cells = [r["setting"], r["learner"], str(r["n"]),
                 _pm(forget["baseline"], False), _pm(forget["diff"], True), f"{forget['pgp_lower']} of {r['n']}",
                 _pm(final["baseline"], False), _pm(final["diff"], True),
                 "-" if til is None else _pm(til["diff"], True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", type=comma_list(SETTINGS), default=",".join(DEFAULT_SETTINGS),
                   help=f"from {', '.join(SETTINGS)} (default: {','.join(DEFAULT_SETTINGS)})")
    p.add_argument("--methods", type=comma_list(LEARNERS), default=",".join(LEARNERS), help=f"from {', '.join(LEARNERS)}")
    p.add_argument("--seeds", type=seed, nargs="+", default=["0", "1", "2"])
    default_out = HERE / "results" / "settings_sweep.json"
    p.add_argument("--out", type=out_path, default=str(default_out),
                   help=f"JSON path (default: {default_out.relative_to(ROOT)})")
    args = p.parse_args()
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        dil = {"dil", "dil_head"} & set(args.settings)
        dil_root = write_rotated_mnist5k(Path(tmp) / "mnist5k_rot") if dil else None
        for setting in args.settings:
            overrides = setting_overrides(setting, dil_root)
            print(" ".join(["pgpcl demo --methods", ",".join(args.methods), *overrides]).replace(tmp, "TMPDIR"), flush=True)
            rows += rows_of(demo_summary(args.methods, overrides, Path(tmp) / setting, args.seeds), setting)
    text = table(rows)
    print(text)
    write_sweep(args.out, "settings_sweep", {
        "seeds": args.seeds, "angles": list(ANGLES), "dil_train_per_class": DIL_TRAIN_PER_CLASS,
        "rows": rows, "table": text, "wall_s": round(time.time() - started)})


if __name__ == "__main__":
    run_main(main)
