"""Training throughput, PGP overhead and peak memory: pgpcl vs the straightforward reference.

For each ViT size and method (L2P, DualPrompt), four training steps are timed round-robin in one
process on the same images: reference, reference + PGP, pgpcl, pgpcl + PGP. A step is the engine's
order: forward (query pass + prompted pass), loss, backward, clip grad norm 1.0, PGP projection,
Adam step. PGP is active as on a second task (a basis from a few random images).

- throughput: median step time -> steps/s and images/s, ratio reference / pgpcl;
- ``--amp bf16``: two more pgpcl cases in the same round-robin, pgpcl and pgpcl + PGP under
  ``torch.autocast(bfloat16)`` around forward and loss (what ``train.amp=bf16`` does), against the
  fp32 reference, and the reference under the same autocast (a like-for-like ratio); pays off only
  where the hardware has bf16 arithmetic (CPU: AVX512-BF16 or AMX);
- PGP overhead: the time spent inside pgpcl's projection hooks, as % of the pgpcl + PGP step
  (measured directly; the difference of two noisy step medians is also reported);
- peak memory (``--memory``): each case in a fresh interpreter; CPU: the peak RSS (``VmHWM`` of
  /proc/self/status) after two steps minus the RSS before the model is built (weights + activations +
  optimizer state); CUDA: torch.cuda.max_memory_allocated.

    python benchmarks/train.py                       # default: Ti, S, B at 224 px, ~5 min on 2 cores
    python benchmarks/train.py --models s --repeats 7
    python benchmarks/train.py --models s --amp bf16 --memory off
    python benchmarks/train.py --device cuda --batch 32 --models b
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import (
    MODEL_LABEL,
    MODELS,
    NUM_CLASSES,
    add_common_args,
    build_vit,
    class_mask,
    clock,
    comma_list,
    finish,
    interleaved,
    maxrss_bytes,
    med,
    mib,
    pgpcl_hooks,
    pgpcl_method,
    positive_int,
    run_case_subprocess,
    run_main,
    set_timm_fused,
    setup,
    spread,
    table,
)
from _reference import build_reference, check_equivalence, dense_projections

DEFAULT_BATCH = {"ti": 8, "s": 4, "b": 2}
LR = 0.03 * 16 / 256


def parse_batch(spec: str) -> dict[str, int]:
    """argparse type: '' -> DEFAULT_BATCH; '8' -> 8 for every model; 'ti=16,s=8' -> per model (others
    default)."""
    if not spec:
        return dict(DEFAULT_BATCH)
    if "=" not in spec:
        return {k: positive_int(spec) for k in DEFAULT_BATCH}
    out = dict(DEFAULT_BATCH)
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {k.strip()!r} in {part!r}; use ti, s or b, "
                                             "e.g. ti=16,s=8")
        out[k.strip()] = positive_int(v)
    return out


def _inputs(batch: int, device, seed: int, task: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 224, 224, generator=g).to(device)
    y = torch.randint(10 * task, 10 * task + 10, (batch,), generator=g).to(device)
    t = torch.full((batch,), task, dtype=torch.long, device=device)
    return x, y, t, class_mask(task, device)


class PgpclCase:
    """pgpcl's method + optimizer; ``step(pgp)`` mirrors Trainer.train_step."""

    def __init__(self, method_name: str, vit, device, hooks_samples: int, seed: int, pgp: bool = True,
                 amp: bool = False):
        torch.manual_seed(seed)
        self.amp = amp
        self.device_type = torch.device(device).type
        self.method = pgpcl_method(method_name, vit).to(device)
        self.params = self.method.trainable_parameters()
        self.opt = torch.optim.Adam(self.params, lr=LR)
        self.hooks = pgpcl_hooks(self.method, hooks_samples, hooks_samples, device, seed) if pgp else None
        self.hook_s: list[float] = []
        self.method.train()

    def step(self, x, y, t, mask, pgp: bool) -> float:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.method(x, t)
            loss = self.method.loss(out, y, mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        hooks = self.hooks if pgp else None
        if hooks is not None:
            start = clock()
            hooks.before_step()
            self.hook_s.append(clock() - start)
        self.opt.step()
        if hooks is not None:
            start = clock()
            hooks.after_step()
            self.hook_s[-1] += clock() - start
        return loss.item()

    def bases(self) -> dict[str, torch.Tensor]:
        mem = self.hooks.pgp.memory
        return {n: mem.basis(n) for n in mem.names()}


class RefCase:
    """The reference model (two ViT copies, eager attention) + optimizer; dense released projection."""

    def __init__(self, method_name: str, vit, device, mats: dict[str, torch.Tensor] | None, seed: int):
        torch.manual_seed(seed)
        self.model = build_reference(method_name, vit, NUM_CLASSES).to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=LR)
        self.mats = mats
        self.proj_s: list[float] = []
        self.model.train()

    def step(self, x, y, t, mask, pgp: bool, amp: bool = False) -> float:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits, aux, idx = self.model(x, t)
            loss = F.cross_entropy(logits.masked_fill(~mask, float("-inf")), y) + aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if pgp:
            start = clock()
            self.model.project(self.mats, idx)
            self.proj_s.append(clock() - start)
        self.opt.step()
        return loss.item()


# ----------------------------------------------------------------------------------------------------
# One memory case, in a fresh interpreter


def _warm_kernels(dev) -> None:
    """Run every kind of kernel once on a tiny model, so that lazily loaded library code (MKL, oneDNN)
    and thread pools are resident before the baseline is taken: the deltas are then tensors only."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=224, patch_size=16, embed_dim=64, depth=1,
                            num_heads=2, num_classes=0).to(dev).eval().requires_grad_(False)
    for fused in (True, False):
        set_timm_fused(vit, fused)
        case = PgpclCase("l2p", vit, dev, 2, 0, pgp=True) if fused else None
        if case is not None:
            x = torch.rand(2, 3, 224, 224, device=dev)
            case.step(x, torch.zeros(2, dtype=torch.long, device=dev), torch.zeros(2, dtype=torch.long, device=dev),
                      class_mask(0, dev), True)
        ref = RefCase("dualprompt", vit, dev, None, 0)
        x = torch.rand(2, 3, 224, 224, device=dev)
        ref.step(x, torch.zeros(2, dtype=torch.long, device=dev), torch.zeros(2, dtype=torch.long, device=dev),
                 class_mask(0, dev), False)


def memory_case(method: str, size: str, impl: str, pgp: bool, batch: int, device: str, threads: int, seed: int):
    torch.set_num_threads(threads)
    dev = torch.device(device)
    _warm_kernels(dev)
    x, y, t, mask = _inputs(batch, dev, seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = maxrss_bytes()
    vit = build_vit(size, dev)
    if impl == "pgpcl":
        case = PgpclCase(method, vit, dev, 8, seed, pgp=pgp)
    else:
        mats = None
        if pgp:  # dense U U^T per group; memory does not depend on the rank, so use D/2 random directions
            d = vit.embed_dim
            names = ["prompt", "key"] if method == "l2p" else ["g_key.l0", "g_key.l1", "e_key.l2", "e_key.l3", "e_key.l4"]
            mats = {n: torch.linalg.qr(torch.randn(d, d // 2, dtype=torch.float64))[0] for n in names}
            mats = dense_projections(mats, dev)
        case = RefCase(method, vit, dev, mats, seed)
    built = torch.cuda.max_memory_allocated() if dev.type == "cuda" else maxrss_bytes()
    module = case.method if impl == "pgpcl" else case.model
    storages = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        st = tensor.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    for _ in range(2):
        case.step(x, y, t, mask, pgp)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else maxrss_bytes()
    print(json.dumps({"weights_and_state_bytes": built - base, "peak_bytes": peak - base,
                      "parameter_bytes": sum(storages.values())}))


# ----------------------------------------------------------------------------------------------------


def run_model(method: str, size: str, args, device) -> dict:
    batch = args.batch[size]
    x, y, t, mask = _inputs(batch, device, args.seed)
    vit = build_vit(size, device)
    ours = PgpclCase(method, vit, device, args.basis_samples, args.seed)
    ref = RefCase(method, copy.deepcopy(vit), device, None, args.seed)
    ref.mats = dense_projections(ours.bases(), device)
    max_diff = check_equivalence(ref.model, ours.method, x[:2], t[:2])
    ours.method.train()
    ref.model.train()
    fns = {
        "reference": lambda: ref.step(x, y, t, mask, False),
        "reference+pgp": lambda: ref.step(x, y, t, mask, True),
        "pgpcl": lambda: ours.step(x, y, t, mask, False),
        "pgpcl+pgp": lambda: ours.step(x, y, t, mask, True),
    }
    bf16 = None
    if args.amp == "bf16":  # same backbone, same seed: same prompts and basis as ``ours``
        bf16 = PgpclCase(method, vit, device, args.basis_samples, args.seed, amp=True)
        bf16.method.eval()
        ours.method.eval()
        with torch.no_grad():
            fp32_logits = ours.method(x[:2], t[:2]).logits
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf16_logits = bf16.method(x[:2], t[:2]).logits.float()
        bf16_diff = (bf16_logits - fp32_logits).abs().max().item()
        bf16.method.train()
        ours.method.train()
        fns["reference bf16"] = lambda: ref.step(x, y, t, mask, False, amp=True)
        fns["pgpcl bf16"] = lambda: bf16.step(x, y, t, mask, False)
        fns["pgpcl+pgp bf16"] = lambda: bf16.step(x, y, t, mask, True)
    ours.hook_s.clear()
    times = interleaved(fns, args.repeats, warmup=1, device=device)
    ours_hook = ours.hook_s[-args.repeats :]
    ref_proj = ref.proj_s[-args.repeats :]
    res = {
        "method": method,
        "model": MODEL_LABEL[size],
        "batch": batch,
        "repeats": args.repeats,
        "logit_max_abs_diff_ref_vs_pgpcl": max_diff,
        "step_s": {k: v for k, v in times.items()},
        "median_step_s": {k: med(v) for k, v in times.items()},
        "spread": {k: spread(v) for k, v in times.items()},
        "images_per_s": {k: batch / med(v) for k, v in times.items()},
        "speedup_no_pgp": med(times["reference"]) / med(times["pgpcl"]),
        "speedup_pgp": med(times["reference+pgp"]) / med(times["pgpcl+pgp"]),
        "pgp_hook_s_median": med(ours_hook),
        "pgp_overhead_pct_direct": 100 * med(ours_hook) / med(times["pgpcl+pgp"]),
        "pgp_overhead_pct_diff": 100 * (med(times["pgpcl+pgp"]) - med(times["pgpcl"])) / med(times["pgpcl"]),
        "ref_projection_s_median": med(ref_proj),
        "basis_ranks": {n: int(b.shape[1]) for n, b in ours.bases().items()},
    }
    if bf16 is not None:
        res["speedup_bf16_no_pgp"] = med(times["reference"]) / med(times["pgpcl bf16"])
        res["speedup_bf16_pgp"] = med(times["reference+pgp"]) / med(times["pgpcl+pgp bf16"])
        res["speedup_bf16_vs_reference_bf16"] = med(times["reference bf16"]) / med(times["pgpcl bf16"])
        res["logit_max_abs_diff_bf16_vs_fp32"] = bf16_diff
    return res


def run_memory(method: str, size: str, args) -> dict:
    batch = args.batch[size]
    out = {}
    for impl in ("reference", "pgpcl"):
        for pgp in (False, True) if args.memory_pgp == "both" else (True,):
            argv = ["--memory-case", method, size, impl, str(int(pgp)), str(batch), args.device,
                    str(args.threads), str(args.seed)]
            r = run_case_subprocess(Path(__file__), argv)
            out[impl + ("+pgp" if pgp else "")] = r
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-case":
        m, s, impl, pgp, b, dev, th, seed = sys.argv[2:10]
        memory_case(m, s, impl, bool(int(pgp)), int(b), dev, int(th), int(seed))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--models", type=comma_list(MODELS), default="ti,s,b", help="comma list of ti, s, b")
    p.add_argument("--methods", type=comma_list(["l2p", "dualprompt"]), default="l2p,dualprompt")
    p.add_argument("--batch", type=parse_batch, default="", help=f"one batch size for all models, or per "
                   f"model as 'ti=16,s=8,b=2'; default {DEFAULT_BATCH}")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed steps per path (after 1 warm-up)")
    p.add_argument("--basis-samples", type=positive_int, default=8, help="random images behind the PGP basis")
    p.add_argument("--memory", choices=["on", "off"], default="on")
    p.add_argument("--timing", choices=["on", "off"], default="on", help="off: memory cases only")
    p.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="bf16: also time pgpcl under bf16 autocast (against the fp32 reference)")
    p.add_argument("--memory-pgp", choices=["pgp", "both"], default="pgp",
                   help="memory cases with PGP only (default) or with and without")
    args = p.parse_args()
    mach = setup(args)
    device = torch.device(args.device)
    results, rows, mem_rows, bf16_rows = [], [], [], []
    for size in args.models:
        for method in args.methods:
            if args.timing == "on":
                r = run_model(method, size, args, device)
            else:
                r = {"method": method, "model": MODEL_LABEL[size], "batch": args.batch[size]}
            if args.memory == "on":
                r["memory"] = run_memory(method, size, args)
            results.append(r)
            if "memory" in r:
                for k in ("reference", "pgpcl", "reference+pgp", "pgpcl+pgp"):
                    if k in r["memory"]:
                        mm = r["memory"][k]
                        mem_rows.append([r["model"], method, r["batch"], k, mib(mm["parameter_bytes"]),
                                         mib(mm["peak_bytes"])])
            if args.timing == "off":
                print(f"done {r['model']} {method} (memory)", flush=True)
                continue
            ms = r["median_step_s"]
            rows.append([r["model"], method, r["batch"], ms["reference"], ms["pgpcl"], r["speedup_no_pgp"],
                         ms["reference+pgp"], ms["pgpcl+pgp"], r["speedup_pgp"],
                         r["pgp_overhead_pct_direct"], r["pgp_overhead_pct_diff"]])
            if "speedup_bf16_no_pgp" in r:
                bf16_rows.append([r["model"], method, r["batch"], ms["reference"], ms["pgpcl bf16"],
                                  r["speedup_bf16_no_pgp"], ms["reference+pgp"], ms["pgpcl+pgp bf16"],
                                  r["speedup_bf16_pgp"], ms["reference bf16"],
                                  r["speedup_bf16_vs_reference_bf16"], r["logit_max_abs_diff_bf16_vs_fp32"]])
            print(f"done {r['model']} {method}: ref/pgpcl {r['speedup_no_pgp']:.2f}x "
                  f"(+pgp {r['speedup_pgp']:.2f}x), logit diff {r['logit_max_abs_diff_ref_vs_pgpcl']:.1e}",
                  flush=True)
    if rows:
        print()
        print(table(["model", "method", "batch", "ref s/step", "pgpcl s/step", "ratio", "ref+pgp", "pgpcl+pgp",
                     "ratio+pgp", "PGP % (hooks)", "PGP % (diff)"], rows))
    if bf16_rows:
        print("\npgpcl under bf16 autocast against the fp32 reference:")
        print(table(["model", "method", "batch", "ref s/step", "pgpcl bf16", "ratio", "ref+pgp",
                     "pgpcl+pgp bf16", "ratio+pgp", "ref bf16", "ratio (both bf16)",
                     "max |logit bf16 - fp32|"], bf16_rows))
    if mem_rows:
        print()
        print(table(["model", "method", "batch", "case", "parameters MiB", "peak MiB"], mem_rows))
    notes = [
        "ratio = reference median step time / pgpcl median step time (higher = pgpcl faster)",
        "PGP % (hooks) = time inside pgpcl's before_step/after_step over the pgpcl+pgp step; "
        "PGP % (diff) = (pgpcl+pgp - pgpcl) / pgpcl from two medians, noisy",
        "peak memory: CPU peak RSS (VmHWM) after two steps minus RSS before the model is built, in a "
        "fresh interpreter whose kernels were warmed on a tiny model first (weights + activations + "
        "Adam state + PGP); CUDA max_memory_allocated. parameters: bytes of the unique parameter and "
        "buffer storages the case holds",
    ]
    finish("train", args, mach, results, notes)


if __name__ == "__main__":
    run_main(main)
