"""Evaluation throughput (images/s): pgpcl vs the reference, and torch.inference_mode vs no_grad.

One evaluation batch = the query pass + the prompted pass + head (CIL logits over all classes), as
``evaluate_method`` runs it. Paths, timed round-robin on the same images:

- ``reference``: two ViT copies, eager attention, under ``torch.no_grad()`` (as released);
- ``pgpcl``: ``method.predict(x)`` under ``torch.no_grad()`` (what the engine does today);
- ``pgpcl+inference_mode``: the same under ``torch.inference_mode()`` (proposed for the engine's
  evaluation loop; no view/version-counter tracking).
- ``--amp bf16`` adds ``reference bf16`` and ``pgpcl bf16``: the same two under
  ``torch.autocast(bfloat16)`` (what ``train.amp=bf16`` does in evaluation too).

    python benchmarks/eval.py                           # ~4 min on 2 shared cores
    python benchmarks/eval.py --models b --batch 128 --device cuda
    python benchmarks/eval.py --amp bf16 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy

import torch

from _common import (
    MODEL_LABEL,
    MODELS,
    NUM_CLASSES,
    add_common_args,
    build_vit,
    comma_list,
    finish,
    interleaved,
    med,
    nonneg_int,
    pgpcl_method,
    positive_int,
    run_main,
    setup,
    table,
)
from _reference import build_reference, check_equivalence

DEFAULT_BATCH = {"ti": 16, "s": 8, "b": 4}


def run_one(name: str, size: str, vit, x, args, device) -> dict:
    torch.manual_seed(args.seed)
    method = pgpcl_method(name, vit).to(device).eval()
    ref = build_reference(name, copy.deepcopy(vit), NUM_CLASSES).to(device).eval()
    few = x[:2]  # the batch may be a single image
    diff = check_equivalence(ref, method, few, torch.zeros(len(few), dtype=torch.long, device=device))
    ref.eval()
    method.eval()

    def run_ref():
        with torch.no_grad():
            ref(x, None)[0].argmax(1)

    def run_nograd():
        with torch.no_grad():
            method.predict(x).argmax(1)

    def run_inference():
        with torch.inference_mode():
            method.predict(x).argmax(1)

    fns = {"reference": run_ref, "pgpcl": run_nograd, "pgpcl+inference_mode": run_inference}
    if args.amp == "bf16":
        def bf16(fn):
            def run():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    fn()
            return run

        fns.update({"reference bf16": bf16(run_ref), "pgpcl bf16": bf16(run_nograd)})
    times = interleaved(fns, args.repeats, 1, device)
    b = x.shape[0]
    r = {
        "model": MODEL_LABEL[size],
        "method": name,
        "batch": b,
        "logit_max_abs_diff_ref_vs_pgpcl": diff,
        "median_batch_s": {k: med(v) for k, v in times.items()},
        "images_per_s": {k: b / med(v) for k, v in times.items()},
        "all": times,
    }
    r["speedup"] = r["median_batch_s"]["reference"] / r["median_batch_s"]["pgpcl"]
    r["inference_mode_gain"] = r["median_batch_s"]["pgpcl"] / r["median_batch_s"]["pgpcl+inference_mode"]
    if args.amp == "bf16":
        r["speedup_bf16_vs_reference_fp32"] = r["median_batch_s"]["reference"] / r["median_batch_s"]["pgpcl bf16"]
        r["speedup_bf16_vs_reference_bf16"] = (r["median_batch_s"]["reference bf16"]
                                               / r["median_batch_s"]["pgpcl bf16"])
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--models", type=comma_list(MODELS), default="ti,s,b", help="comma list of ti, s, b")
    p.add_argument("--methods", type=comma_list(["l2p", "dualprompt"]), default="l2p,dualprompt")
    p.add_argument("--batch", type=nonneg_int, default=0, help=f"0 = per model {DEFAULT_BATCH}")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="bf16: also time pgpcl and the reference under bf16 autocast")
    args = p.parse_args()
    mach = setup(args)
    device = torch.device(args.device)
    results, rows, bf16_rows = [], [], []
    for size in args.models:
        b = args.batch or DEFAULT_BATCH[size]
        x = torch.rand(b, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed)).to(device)
        vit = build_vit(size, device)
        for name in args.methods:
            r = run_one(name, size, vit, x, args, device)
            results.append(r)
            ips = r["images_per_s"]
            rows.append([r["model"], name, b, ips["reference"], ips["pgpcl"], r["speedup"],
                         ips["pgpcl+inference_mode"], r["inference_mode_gain"]])
            if args.amp == "bf16":
                bf16_rows.append([r["model"], name, b, ips["reference"], ips["reference bf16"], ips["pgpcl bf16"],
                                  r["speedup_bf16_vs_reference_fp32"], r["speedup_bf16_vs_reference_bf16"]])
            print(f"done {r['model']} {name} (logit diff {r['logit_max_abs_diff_ref_vs_pgpcl']:.1e})", flush=True)
    print()
    print(table(["model", "method", "batch", "ref img/s", "pgpcl img/s", "pgpcl/ref",
                 "pgpcl+inference_mode img/s", "inference_mode/no_grad"], rows))
    if bf16_rows:
        print("\nbf16 autocast:")
        print(table(["model", "method", "batch", "ref fp32 img/s", "ref bf16 img/s", "pgpcl bf16 img/s",
                     "pgpcl bf16 / ref fp32", "pgpcl bf16 / ref bf16"], bf16_rows))
    notes = ["img/s from the median batch time; pgpcl/ref > 1 means pgpcl is faster"]
    finish("eval", args, mach, results, notes)


if __name__ == "__main__":
    run_main(main)
