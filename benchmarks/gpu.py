"""GPU training throughput, peak memory and model FLOPs utilisation (MFU), ViT-B/16 L2P-PGP and DualPrompt-PGP.

One command on a CUDA machine:

    python benchmarks/gpu.py                    # ViT-B/16, batch 64, fp32 and bf16, pgpcl and reference

For each method (PGP active, as on a second task) and precision (fp32; bf16 = torch.autocast, what
``train.amp=bf16`` does) it times ``--steps`` training steps after ``--warmup`` steps (the engine's
step: query pass, prompted forward, loss, backward, clip, projection, Adam), with CUDA synchronised,
and reports images/s, peak memory (torch.cuda.max_memory_allocated, reset per case) and
MFU = (FLOPs of one step / step time) / the GPU's dense bf16 peak. FLOPs are counted once per case
with torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions and attention, forward and
backward; the same count for fp32 and bf16). The reference (two ViT copies, eager attention, dense
projection) runs the same cases unless ``--reference off``.

Without a CUDA device it prints a message and exits with status 1 (``--allow-cpu`` runs a tiny
smoke version on the CPU, to check the script itself; its numbers mean nothing, so it needs an explicit
``--out`` and never writes into benchmarks/results by default).
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import (
    MODELS,
    add_common_args,
    build_vit,
    clock,
    comma_list,
    finish,
    med,
    nonneg_int,
    positive_int,
    run_main,
    setup,
    table,
)

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched by substring of the
# device name, most specific first. --peak-tflops overrides.
BF16_PEAK = [
    ("H200", 989.4e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),  # fp16 (no bf16 on V100)
]


def bf16_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK:
        if key in name:
            return peak
    return None


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return int(fc.get_total_flops())


def run_case(impl: str, method: str, size: str, dtype: str, args, device) -> dict:
    import train as T

    b = args.batch
    x, y, t, mask = T._inputs(b, device, args.seed)
    vit = build_vit(size, device)
    ours = T.PgpclCase(method, vit, device, args.basis_samples, args.seed)
    if impl == "reference":
        mats = T.dense_projections(ours.bases(), device)
        del ours  # the reference then holds exactly two copies of the ViT (its own + the query copy)
        ref = T.RefCase(method, vit, device, mats, args.seed)
        step_fn = ref.step
    else:
        step_fn = ours.step
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with amp:
            step_fn(x, y, t, mask, True)

    # autocast around the whole step only changes the forward (backward follows the forward's
    # dtypes); Trainer wraps forward + loss only, which is equivalent.
    for _ in range(args.warmup):
        step()
    counted = count_flops(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            s = clock()
            step()
            times.append(clock() - s)
    peak_mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    step_s = med(times)
    return {
        "impl": impl,
        "method": method,
        "dtype": dtype,
        "batch": b,
        "median_step_s": step_s,
        "step_s": times,
        "images_per_s": b / step_s,
        "counted_flops_per_step": counted,
        "peak_memory_bytes": peak_mem,
    }


def model_flops(method: str, size: str, args, device) -> int:
    """FLOPs of one training step of the algorithm, implementation-independent: counted on the
    reference step, whose attention is plain matmuls (FlopCounterMode has no formula for some fused
    attention kernels, e.g. SDPA's CPU flash kernel, so counting pgpcl's step can miss them)."""
    import train as T

    x, y, t, mask = T._inputs(args.batch, device, args.seed)
    vit = build_vit(size, device)
    ref = T.RefCase(method, vit, device, None, args.seed)
    ref.step(x, y, t, mask, False)
    return count_flops(lambda: ref.step(x, y, t, mask, False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(device="cuda")
    p.add_argument("--model", choices=list(MODELS), default="b", help="ti, s or b (default b = ViT-B/16)")
    p.add_argument("--methods", type=comma_list(["l2p", "dualprompt"]), default="l2p,dualprompt")
    p.add_argument("--dtypes", type=comma_list(["fp32", "bf16"]), default="fp32,bf16")
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--warmup", type=nonneg_int, default=5)
    p.add_argument("--basis-samples", type=positive_int, default=64)
    p.add_argument("--reference", choices=["on", "off"], default="on")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 dense peak (TFLOP/s)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (default: full fp32)")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.allow_cpu and args.out is None:
        p.error("--allow-cpu is a smoke test whose numbers mean nothing; give --out (e.g. /tmp/gpu_cpu_smoke.json) "
                "so that they stay out of benchmarks/results")
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("benchmarks/gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
              "nothing was measured. Run it on a GPU machine: python benchmarks/gpu.py")
        sys.exit(1)
    if args.allow_cpu:
        args.device = "cpu"
    mach = setup(args)
    device = torch.device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test)"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else bf16_peak(name)
    results, rows = [], []
    impls = ["pgpcl", "reference"] if args.reference == "on" else ["pgpcl"]
    for method in args.methods:
        flops = model_flops(method, args.model, args, device)
        for dtype in args.dtypes:
            for impl in impls:
                r = run_case(impl, method, args.model, dtype, args, device)
                r["model_flops_per_step"] = flops
                r["achieved_tflops"] = flops / r["median_step_s"] / 1e12
                r["mfu_vs_bf16_peak"] = flops / r["median_step_s"] / peak if peak else None
                results.append(r)
                mem = r["peak_memory_bytes"]
                rows.append([method + "-pgp", dtype, impl, r["batch"], r["images_per_s"], r["achieved_tflops"],
                             f"{100 * r['mfu_vs_bf16_peak']:.1f}%" if r["mfu_vs_bf16_peak"] is not None else "-",
                             f"{mem / 2**30:.2f}" if mem is not None else "-"])
                print(f"done {method} {dtype} {impl}: {r['images_per_s']:.1f} img/s", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"\ndevice: {name}; bf16 dense peak used for MFU: "
          f"{peak / 1e12:.0f} TFLOP/s" if peak else f"\ndevice: {name}; bf16 peak unknown (pass --peak-tflops)")
    print(table(["method", "dtype", "impl", "batch", "images/s", "TFLOP/s", "MFU (bf16 peak)", "peak GiB"], rows))
    notes = [
        f"device {name}; MFU against the dense bf16 peak {peak / 1e12 if peak else None} TFLOP/s",
        "model FLOPs: torch.utils.flop_counter.FlopCounterMode over one whole training step of the "
        "reference (query pass + prompted forward + backward, attention as plain matmuls), used for "
        "both implementations; counted_flops_per_step is what the counter saw on each path",
        f"fp32 matmuls {'TF32 allowed' if args.tf32 else 'in full fp32 (TF32 off)'}",
    ]
    finish("gpu", args, {**mach, "gpu": name, "bf16_peak_flops": peak}, results, notes)


if __name__ == "__main__":
    run_main(main)
