"""PGP basis building time per task: pgpcl (batched, streaming Gram) vs per-sample reference.

pgpcl: ``PGPHooks.build_basis`` exactly as the engine calls it (the method's ``representations`` on
batches of ``pgp.sample_batch_size`` images, float64 Gram accumulated per batch, one eigh per group).
Reference: one image at a time through a two-copy eager model, rows stacked, one SVD of the stacked
rows per group (same feature-space geometry, so the same basis up to rounding).
pgpcl's DualPrompt pass picks the true task's E-prompt without a query pass and stops after the last
prefixed layer (``PromptedViT.queries``); the reference runs the query and the whole prompted model.

The released configs use 768 samples; ViT-B forwards of 768 images take minutes on a CPU, so the
default CPU run uses fewer samples and shows the scaling (time per sample is flat: the forward
passes dominate). ``--algebra`` times the sample-count-dependent linear algebra alone at the
released scale (768 x 196 token rows of width 768), where a stacked-rows SVD and the streaming Gram
differ most.

    python benchmarks/basis.py                         # ~5 min on 2 shared cores
    python benchmarks/basis.py --models b --samples 768 --device cuda
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
    clock,
    comma_list,
    finish,
    pgpcl_method,
    positive_int,
    positive_ints,
    random_loader,
    run_main,
    setup,
    sync,
    table,
)
from _reference import build_basis_per_sample, build_reference, copy_trainables


def pgpcl_build(method, loader, device) -> tuple[float, dict, dict]:
    """Time one PGPHooks.build_basis; returns (seconds, ranks, bases)."""
    from pgpcl.config import PGPConfig
    from pgpcl.engine.pgp_hooks import PGPHooks

    hooks = PGPHooks(method, PGPConfig(enabled=True), device)
    sync(device)
    start = clock()
    hooks.build_basis(0, loader)
    sync(device)
    elapsed = clock() - start
    mem = hooks.pgp.memory
    return elapsed, {n: mem.rank(n) for n in mem.names()}, {n: mem.basis(n) for n in mem.names()}


def ref_build(ref, method, loader, device, batch: int) -> tuple[float, dict, dict]:
    images = torch.cat([b[0] for b in loader])
    tasks = torch.cat([b[2] for b in loader])
    eps = {g.name: g.eps for g in method.protected_groups({**method.default_eps})}
    extra = {k: v for k, v in method.extra_representations().items()}
    sync(device)
    start = clock()
    bases = build_basis_per_sample(ref, images, tasks, eps, extra, batch=batch)
    sync(device)
    elapsed = clock() - start
    return elapsed, {n: int(b.shape[1]) for n, b in bases.items()}, bases


def subspace_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between span(a) and span(b) of equal rank (0 = same span)."""
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        return float("nan")
    s = torch.linalg.svdvals(a.T.double() @ b.double())
    return float((1 - s.min().clamp(max=1.0) ** 2).clamp(min=0).sqrt())


def algebra(dim: int, samples: int, tokens: int, batch: int) -> dict:
    """The linear algebra alone at the released scale: streaming Gram + eigh vs stacked rows + SVD."""
    from pgpcl.projection.collect import GramCollector
    from pgpcl.projection.linalg import grow_basis

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(min(batch, samples - s), tokens, dim, generator=g) for s in range(0, samples, batch)]
    start = clock()
    col = GramCollector(dim)
    for c in chunks:
        col.add(c)
    basis, _, _ = grow_basis(torch.zeros(dim, 0, dtype=torch.float64), col.gram(), 0.5)
    gram_s = clock() - start
    start = clock()
    rows = torch.cat([c.reshape(-1, dim) for c in chunks]).double()
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    svd_s = clock() - start
    return {
        "rows": samples * tokens,
        "dim": dim,
        "pgpcl_gram_eigh_s": gram_s,
        "reference_stack_svd_s": svd_s,
        "ratio": svd_s / gram_s,
        "reference_rows_bytes": rows.numel() * rows.element_size(),
        "pgpcl_gram_bytes": dim * dim * 8,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--models", type=comma_list(MODELS), default="s,b", help="comma list of ti, s, b")
    p.add_argument("--methods", type=comma_list(["l2p", "dualprompt"]), default="l2p,dualprompt")
    p.add_argument("--samples", type=positive_ints, default="",
                   help="comma list; default per model: s 16,32,64; b 32; ti 64,128")
    p.add_argument("--sample-batch", type=positive_int, default=64, help="pgpcl pgp.sample_batch_size (default 64)")
    p.add_argument("--ref-batch", type=positive_int, default=1, help="reference images per forward (1 = per sample)")
    p.add_argument("--algebra", choices=["on", "off"], default="on")
    args = p.parse_args()
    mach = setup(args)
    device = torch.device(args.device)
    default_samples = {"ti": [64, 128], "s": [16, 32, 64], "b": [32]}
    results, rows = [], []
    for size in args.models:
        vit = build_vit(size, device)
        for name in args.methods:
            torch.manual_seed(args.seed)
            method = pgpcl_method(name, vit).to(device)
            ref = build_reference(name, copy.deepcopy(vit), NUM_CLASSES).to(device)
            copy_trainables(ref, method)
            counts = args.samples or default_samples[size]
            for n in counts:
                loader = random_loader(n, args.sample_batch, device, seed=args.seed)
                # Alternate the order between sample counts so load drift does not favour one path.
                paths = ["reference", "pgpcl"]
                if n % 2:
                    paths.reverse()
                out = {}
                for path in paths:
                    if path == "reference":
                        out[path] = ref_build(ref, method, loader, device, args.ref_batch)
                    else:
                        out[path] = pgpcl_build(method, loader, device)
                gaps = {g: subspace_gap(out["pgpcl"][2][g], out["reference"][2][g]) for g in out["pgpcl"][2]}
                r = {
                    "model": MODEL_LABEL[size],
                    "method": name,
                    "samples": n,
                    "seconds": {k: v[0] for k, v in out.items()},
                    "seconds_per_sample": {k: v[0] / n for k, v in out.items()},
                    "ranks": {k: v[1] for k, v in out.items()},
                    "sin_max_angle_pgpcl_vs_reference": gaps,
                    "speedup": out["reference"][0] / out["pgpcl"][0],
                }
                results.append(r)
                rows.append([r["model"], name, n, out["reference"][0], out["pgpcl"][0], r["speedup"],
                             1e3 * out["pgpcl"][0] / n, max(gaps.values())])
                print(f"done {r['model']} {name} n={n}", flush=True)
            del method, ref
        del vit
    print()
    print(table(["model", "method", "samples", "ref s", "pgpcl s", "ratio", "pgpcl ms/sample",
                 "max sin angle"], rows))
    alg = None
    if args.algebra == "on":
        alg = algebra(768, 768, 196, args.sample_batch)
        print(f"\nlinear algebra at the released scale ({alg['rows']} x {alg['dim']} rows): "
              f"pgpcl Gram+eigh {alg['pgpcl_gram_eigh_s']:.1f} s, reference stacked SVD "
              f"{alg['reference_stack_svd_s']:.1f} s ({alg['ratio']:.2f}x); memory "
              f"{alg['reference_rows_bytes'] / 2**20:.0f} MiB of rows vs {alg['pgpcl_gram_bytes'] / 2**20:.1f} MiB Gram")
    notes = [
        f"reference feeds {args.ref_batch} image(s) per forward; pgpcl {args.sample_batch}",
        "max sin angle: largest principal-angle sine between pgpcl's and the reference's basis "
        "(same rank); ~0 means the same subspace",
    ]
    finish("basis", args, mach, {"cases": results, "algebra": alg}, notes)


if __name__ == "__main__":
    run_main(main)
