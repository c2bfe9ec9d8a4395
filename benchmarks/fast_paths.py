"""Each fast path measured on its own (ViT-S/16 at 224 px unless said otherwise).

Sections (``--sections``, comma list; default all):

- ``profile``: where a training step's CPU time goes (torch.profiler, L2P and DualPrompt, pgpcl and
  reference): dense matmuls of the linear layers, attention kernels, everything else.
- ``attention``: fused (F.scaled_dot_product_attention, pgpcl's default) vs eager softmax(QK^T)V,
  for the prompt path (L2P tokens after CLS) and the prefix path (DualPrompt K/V prefixes), forward +
  backward (training) and no-grad forward (evaluation). Both timm's own blocks and PromptedViT's
  prefixed blocks are switched.
- ``attention_kernel``: the attention product alone, F.scaled_dot_product_attention vs eager
  softmax(QK^T)V, in fp32 and bf16, forward + backward and forward, at the model's L2P shapes
  (B, heads, 222 tokens, head dim). Behind PromptedViT's choice of the plain product in bf16 / fp16
  on the CPU.
- ``clip_bf16``: the CLIP prompt learner's image side (CLIP ViT-B/16, random weights, an image prompt
  of 5 tokens; forward + backward to the prompt) in fp32, in bf16 through open_clip's
  ``nn.MultiheadAttention`` (what PromptedCLIP did before), and in bf16 with the plain product
  (``run_transformer``, what it does now on the CPU).
- ``bf16``: pgpcl's L2P training step in fp32 vs under torch.autocast(bfloat16) (what
  ``train.amp=bf16`` does) on this device.
- ``query``: counts the query passes (un-prompted ViT forwards) and prompted passes per training
  step, per evaluation batch and per PGP representation batch, for L2P and DualPrompt.
- ``query_cls``: the query pass, timm's full ``forward_features(x)[:, 0]`` (pgpcl's earlier
  ``PromptedViT.query``) vs the current ``PromptedViT.query``, which runs the last block for the CLS
  row only (same values).
- ``compile``: torch.compile of every ViT block (the frozen backbone) vs eager, L2P training step:
  compile time (first step) and steady-state step time, round-robin after compilation.
- ``loader``: DataLoader throughput (MNIST-5k digits through the released ViT train transform at
  224 px: RandomResizedCrop + flip) with 0 / 1 / 2 workers, pin_memory when CUDA is present, against
  the training step's own images/s.

    python benchmarks/fast_paths.py                     # ~5 min on 2 shared cores
    python benchmarks/fast_paths.py --sections attention,query --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from _common import (
    MODELS,
    add_common_args,
    build_vit,
    class_mask,
    clock,
    comma_list,
    finish,
    interleaved,
    med,
    pgpcl_method,
    positive_int,
    run_main,
    setup,
    sync,
    table,
)

SECTIONS = ("profile", "attention", "attention_kernel", "clip_bf16", "bf16", "query", "query_cls", "compile", "loader")


def _images(b: int, device, seed: int = 0, size: int = 224) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


# ----------------------------------------------------------------------------------------------------


def attention(args, device) -> dict:
    from pgpcl.models import PromptedViT

    vit = build_vit(args.model, device)
    d, b = vit.embed_dim, args.batch
    x = _images(b, device)
    fused = PromptedViT(vit, fused_attention=True)
    eager = PromptedViT(copy.deepcopy(vit), fused_attention=False)  # eager in timm's blocks too
    g = torch.Generator().manual_seed(1)
    prompts = torch.randn(b, 25, d, generator=g).to(device).requires_grad_(True)  # L2P: 5 prompts x 5 tokens
    prefixes = {
        i: (torch.randn(b, 5, d, generator=g).to(device).requires_grad_(True),
            torch.randn(b, 5, d, generator=g).to(device).requires_grad_(True))
        for i in range(5)
    }  # DualPrompt: layers 0-4, length 5

    def train_fn(model, kind):
        def f():
            kw = {"prompts": prompts} if kind == "prompt" else {"prefixes": prefixes}
            out = model.forward_features(x, **kw).tokens
            out[:, 0].sum().backward()
        return f

    def eval_fn(model, kind):
        @torch.no_grad()
        def f():
            kw = {"prompts": prompts} if kind == "prompt" else {"prefixes": prefixes}
            model.forward_features(x, **kw)
        return f

    res, rows = {}, []
    with torch.no_grad():
        diff_p = float((fused.forward_features(x, prompts=prompts).tokens
                        - eager.forward_features(x, prompts=prompts).tokens).abs().max())
        diff_k = float((fused.forward_features(x, prefixes=prefixes).tokens
                        - eager.forward_features(x, prefixes=prefixes).tokens).abs().max())
    for kind in ("prompt", "prefix"):
        for mode, make in (("train fwd+bwd", train_fn), ("eval fwd", eval_fn)):
            times = interleaved({"eager": make(eager, kind), "fused": make(fused, kind)}, args.repeats, 1, device)
            r = {"eager_s": med(times["eager"]), "fused_s": med(times["fused"]), "all": times}
            r["speedup"] = r["eager_s"] / r["fused_s"]
            res[f"{kind}/{mode}"] = r
            rows.append([kind, mode, r["eager_s"], r["fused_s"], r["speedup"]])
    print(table(["path", "pass", "eager s", "fused s", "eager/fused"], rows))
    print(f"max |fused - eager| token difference: prompt path {diff_p:.1e}, prefix path {diff_k:.1e}")
    res["max_abs_diff"] = {"prompt": diff_p, "prefix": diff_k}
    return res


def _eager_product(q, k, v):
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def attention_kernel(args, device) -> dict:
    vit = build_vit(args.model, device)
    heads = vit.blocks[0].attn.num_heads
    shape = (args.batch, heads, 1 + vit.patch_embed.num_patches + 25, vit.embed_dim // heads)
    kernels = {"eager": _eager_product, "fused": torch.nn.functional.scaled_dot_product_attention}
    res, rows = {"shape": list(shape)}, []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))

        def train_fn(f, qkv=(q, k, v)):
            return lambda: f(*qkv).float().sum().backward()

        def eval_fn(f, qkv=(q, k, v)):
            return lambda: torch.no_grad()(f)(*qkv)

        for mode, make in (("fwd+bwd", train_fn), ("fwd", eval_fn)):
            times = interleaved({n: make(f) for n, f in kernels.items()}, args.query_repeats, 1, device)
            r = {"eager_s": med(times["eager"]), "fused_s": med(times["fused"]), "all": times}
            r["speedup"] = r["eager_s"] / r["fused_s"]
            name = str(dtype).removeprefix("torch.")
            res[f"{name}/{mode}"] = r
            rows.append([name, mode, 1e3 * r["eager_s"], 1e3 * r["fused_s"], r["speedup"]])
    print(f"shape (B, heads, tokens, head dim) = {shape}, one layer")
    print(table(["dtype", "pass", "eager ms", "fused ms", "eager/fused"], rows))
    return res


def clip_bf16(args, device) -> dict:
    import pgpcl.models.clip as C

    model = C.create_clip(C.clip_model_config("ViT-B-16")).to(device)
    bb = C.PromptedCLIP(model, None)
    x = _images(args.bf16_batch, device)
    prompts = torch.randn(5, bb.embed_dim, generator=torch.Generator().manual_seed(1)).to(device)
    prompts.requires_grad_(True)
    plain = C.plain_product_preferred

    def step(amp: bool, mha: bool):
        def f():
            # mha: what PromptedCLIP did before run_transformer (open_clip's own forward, always)
            C.plain_product_preferred = (lambda t: False) if mha else plain
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = bb.encode_image(x, prompts)
                out.float().sum().backward()
            finally:
                C.plain_product_preferred = plain
        return f

    times = interleaved({"fp32": step(False, False), "bf16 open_clip MHA": step(True, True),
                         "bf16 plain product": step(True, False)}, args.bf16_repeats, 1, device)
    r = {"batch": args.bf16_batch, "median_s": {k: med(v) for k, v in times.items()}, "all": times}
    m = r["median_s"]
    print(table(["batch", "fp32 s", "bf16 open_clip MHA s", "bf16 plain product s", "fp32 / bf16 plain",
                 "MHA / plain"],
                [[args.bf16_batch, m["fp32"], m["bf16 open_clip MHA"], m["bf16 plain product"],
                  m["fp32"] / m["bf16 plain product"], m["bf16 open_clip MHA"] / m["bf16 plain product"]]]))
    return r


# ----------------------------------------------------------------------------------------------------


def _l2p_step(method, opt, x, y, mask, amp: bool, device):
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else torch.autocast(device.type, enabled=False)
    with ctx:
        out = method(x, None)
        loss = method.loss(out, y, mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), 1.0)
    opt.step()
    return loss.item()


def bf16(args, device) -> dict:
    b = args.bf16_batch
    vit = build_vit(args.model, device)
    method = pgpcl_method("l2p", vit).to(device).train()
    opt = torch.optim.Adam(method.trainable_parameters(), lr=1e-3)
    x = _images(b, device)
    y = torch.randint(0, 10, (b,)).to(device)
    mask = class_mask(0, device)
    times = interleaved(
        {"fp32": lambda: _l2p_step(method, opt, x, y, mask, False, device),
         "bf16": lambda: _l2p_step(method, opt, x, y, mask, True, device)},
        args.bf16_repeats, 1, device,
    )
    r = {"batch": b, "fp32_s": med(times["fp32"]), "bf16_s": med(times["bf16"]), "all": times}
    r["speedup"] = r["fp32_s"] / r["bf16_s"]
    print(table(["batch", "fp32 s/step", "bf16 autocast s/step", "fp32/bf16"],
                [[b, r["fp32_s"], r["bf16_s"], r["speedup"]]]))
    return r


# ----------------------------------------------------------------------------------------------------


_GEMM = {"aten::addmm", "aten::mm"}
_ATTN = {"aten::bmm", "aten::_softmax", "aten::_softmax_backward_data", "aten::baddbmm"}


def _bucket(name: str) -> str:
    if name in _GEMM:
        return "linear matmuls"
    if name in _ATTN or "scaled_dot_product" in name:
        return "attention"
    return "other"


def profile(args, device) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import train as T

    x, y, t, mask = T._inputs(args.batch, device, args.seed)
    res, rows = {}, []
    for method in ("l2p", "dualprompt"):
        vit = build_vit(args.model, device)
        cases = {"pgpcl": T.PgpclCase(method, vit, device, 8, args.seed)}
        cases["reference"] = T.RefCase(method, copy.deepcopy(vit), device, None, args.seed)
        for impl, case in cases.items():
            case.step(x, y, t, mask, False)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch_profile(activities=acts) as prof:
                case.step(x, y, t, mask, False)
            buckets: dict[str, float] = {}
            for ev in prof.key_averages():
                self_us = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total
                buckets[_bucket(ev.key)] = buckets.get(_bucket(ev.key), 0.0) + self_us / 1e6
            total = sum(buckets.values())
            res[f"{method}/{impl}"] = {"seconds": buckets, "total_s": total}
            rows.append([method, impl, total, *(f"{100 * buckets.get(k, 0) / total:.1f}%"
                                                 for k in ("linear matmuls", "attention", "other"))])
    print(table(["method", "impl", "profiled s", "linear matmuls", "attention", "other"], rows))
    return res


def query_cls(args, device) -> dict:
    from pgpcl.models import PromptedViT

    res, rows = {}, []
    for size, b in ((args.model, args.batch), ("b", max(1, args.batch // 2))):
        pv = PromptedViT(build_vit(size, device))
        x = _images(b, device)
        with torch.no_grad():
            diff = float((pv.vit.forward_features(x)[:, 0] - pv.query(x)).abs().max())
        times = interleaved({"timm full": lambda pv=pv, x=x: pv.vit.forward_features(x)[:, 0],
                             "cls-only last block": lambda pv=pv, x=x: pv.query(x)},
                            args.query_repeats, 1, device)
        r = {"batch": b, "full_s": med(times["timm full"]), "cls_only_s": med(times["cls-only last block"]),
             "max_abs_diff": diff, "all": times}
        r["speedup"] = r["full_s"] / r["cls_only_s"]
        res[size] = r
        rows.append([size, b, r["full_s"], r["cls_only_s"], r["speedup"], f"{diff:.1e}"])
    print(table(["model", "batch", "full forward s", "cls-only last block s", "full/cls-only", "max diff"], rows))
    return res


def _count_passes(name: str, rows: list) -> dict:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=6, num_classes=0)
    vit.requires_grad_(False).eval()
    method = pgpcl_method(name, vit)
    counts = {"query": 0, "prompted": 0, "blocks": 0}
    # Every un-prompted pass goes through _query: query() and L2P's patch_tokens_and_query() alike.
    orig_q = method.backbone._query
    orig_pff = method.backbone.forward_features

    def count_query(*a, **k):
        counts["query"] += 1
        return orig_q(*a, **k)

    def count_prompted(*a, **k):
        counts["prompted"] += 1
        return orig_pff(*a, **k)

    def count_block(*_):
        counts["blocks"] += 1

    method.backbone._query = count_query
    method.backbone.forward_features = count_prompted
    for blk in vit.blocks:
        blk.norm1.register_forward_hook(count_block)
    x = torch.rand(4, 3, 32, 32)
    t = torch.zeros(4, dtype=torch.long)
    per = {}
    method.train()
    calls = [
        ("training step", lambda: method.loss(method(x, t), t, class_mask(0, "cpu")).backward()),
        ("evaluation batch", lambda: method.predict(x)),
        ("PGP representation batch", lambda: method.representations(x, t)),
    ]
    for label, fn in calls:
        for k in counts:
            counts[k] = 0
        if label != "training step":
            method.eval()
        fn()
        per[label] = dict(counts)
        rows.append([name, label, counts["query"], counts["prompted"], counts["blocks"]])
    return per


def query(args, device) -> dict:
    """Count un-prompted (query) and prompted ViT passes; a tiny ViT is enough to count."""
    res, rows = {}, []
    for name in ("l2p", "dualprompt"):
        res[name] = _count_passes(name, rows)
    print(table(["method", "call", "query passes", "prompted passes", "block runs (ViT depth 6)"], rows))
    return res


# ----------------------------------------------------------------------------------------------------


def compile_(args, device) -> dict:
    import train as T

    b = args.batch
    x, y, t, mask = T._inputs(b, device, args.seed)
    vit_e = build_vit(args.model, device)
    vit_c = copy.deepcopy(vit_e)
    eager = T.PgpclCase("l2p", vit_e, device, 8, args.seed)
    comp = T.PgpclCase("l2p", vit_c, device, 8, args.seed)
    eager.step(x, y, t, mask, True)  # warm
    wall0, cpu0 = time.perf_counter(), time.process_time()
    eager.step(x, y, t, mask, True)
    eager_first = (time.perf_counter() - wall0, time.process_time() - cpu0)
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = not args.compile_cache  # cold compile: no on-disk cache reuse
    for blk in vit_c.blocks:
        blk.compile()
    sync(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    comp.step(x, y, t, mask, True)
    sync(device)
    compile_wall, compile_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    times = interleaved({"eager": lambda: eager.step(x, y, t, mask, True),
                         "compiled": lambda: comp.step(x, y, t, mask, True)}, args.repeats, 1, device)
    r = {
        "batch": b,
        "cold_compile": not args.compile_cache,
        "first_compiled_step_wall_s": compile_wall,
        "first_compiled_step_process_cpu_s": compile_cpu,
        "eager_step_wall_s_before": eager_first[0],
        "eager_s": med(times["eager"]),
        "compiled_s": med(times["compiled"]),
        "all": times,
    }
    r["speedup"] = r["eager_s"] / r["compiled_s"]
    gain = r["eager_s"] - r["compiled_s"]
    r["break_even_steps"] = (compile_wall / gain) if gain > 0 else None
    print(table(["batch", "first step (compile) wall s", "eager s/step", "compiled s/step", "eager/compiled",
                 "steps to repay compile"],
                [[b, compile_wall, r["eager_s"], r["compiled_s"], r["speedup"],
                  f"{r['break_even_steps']:.0f}" if r["break_even_steps"] else "never"]]))
    return r


# ----------------------------------------------------------------------------------------------------


def loader(args, device) -> dict:
    from pgpcl.config import DataConfig
    from pgpcl.data import build_scenario

    res, rows = {}, []
    options = [(0, False), (1, False), (2, False)]
    if torch.cuda.is_available():
        options += [(2, True), (4, True)]
    for workers, pin in options:
        cfg = DataConfig(dataset="mnist5k", num_tasks=5, img_size=224, channels=3, train_transform="vit",
                         test_transform="vit", num_workers=workers, pin_memory=pin)
        sc = build_scenario(cfg, 0)
        start = time.perf_counter()
        it = iter(sc.train_loader(0, args.loader_batch, generator_seed=0))
        next(it)
        first = time.perf_counter() - start
        n, start = 0, time.perf_counter()
        for x, _, _ in it:
            n += len(x)
            if n >= args.loader_images:
                break
        rate = n / (time.perf_counter() - start)
        res[f"workers={workers},pin={pin}"] = {"first_batch_s": first, "images_per_s": rate}
        rows.append([workers, pin, first, rate])
    print(table(["workers", "pin_memory", "first batch s", "images/s"], rows))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--sections", type=comma_list(SECTIONS), default=",".join(SECTIONS),
                   help=f"comma list of {', '.join(SECTIONS)} (default all)")
    p.add_argument("--model", choices=list(MODELS), default="s", help="ti, s or b (default s)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--query-repeats", type=positive_int, default=9)
    p.add_argument("--bf16-batch", type=positive_int, default=2)
    p.add_argument("--bf16-repeats", type=positive_int, default=2)
    p.add_argument("--compile-cache", action="store_true",
                   help="let torch.compile reuse its on-disk cache (default: cold compile, caches disabled)")
    p.add_argument("--loader-batch", type=positive_int, default=16)
    p.add_argument("--loader-images", type=positive_int, default=480)
    args = p.parse_args()
    mach = setup(args)
    device = torch.device(args.device)
    fns = {"profile": profile, "attention": attention, "attention_kernel": attention_kernel, "clip_bf16": clip_bf16, "bf16": bf16, "query": query, "query_cls": query_cls, "compile": compile_,
           "loader": loader}
    results = {}
    for s in args.sections:
        print(f"\n== {s} ==", flush=True)
        start = clock()
        results[s] = fns[s](args, device)
        results[s]["section_s"] = clock() - start
    notes = [
        "ratios > 1 mean the fast path is faster",
        "compile: the first compiled step's wall time includes inductor's C++ compilation (worker "
        "processes), whatever --clock says",
    ]
    finish("fast_paths", args, mach, results, notes)


if __name__ == "__main__":
    run_main(main)
