"""Shared helpers for the benchmark scripts: set-up, machine record, timing, memory, tables, JSON.

Every benchmark is a plain script (``python benchmarks/NAME.py [--args]``) that prints a table and
writes ``benchmarks/results/NAME.json``. Timings on a shared CPU are noisy, so the pgpcl path and the
reference path are always timed *interleaved* in the same process (ref, pgpcl, ref, pgpcl, ...) and
reported as medians; the machine's load average is recorded before and after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

if str(ROOT / "src") not in sys.path:  # runnable without installing pgpcl or setting PYTHONPATH
    sys.path.insert(0, str(ROOT / "src"))

# Released-config sizes of the ViTs the benchmarks use (timm names; random weights: speed does not
# depend on weight values).
MODELS = {
    "ti": "vit_tiny_patch16_224",
    "s": "vit_small_patch16_224",
    "b": "vit_base_patch16_224",
}
MODEL_LABEL = {"ti": "ViT-Ti/16", "s": "ViT-S/16", "b": "ViT-B/16"}
NUM_CLASSES = 100  # 10-split CIFAR-100
TASK_CLASSES = [list(range(10 * t, 10 * t + 10)) for t in range(10)]


# ----------------------------------------------------------------------------------------------------
# Set-up and machine record


class ChildFailed(Exception):
    """A child process of a benchmark exited non-zero; the message is one line."""


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def comma_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma list whose every item is one of ``choices``."""
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        items = [v.strip() for v in text.split(",")]
        bad = next((v for v in items if v not in allowed), None)
        if bad is not None:
            raise argparse.ArgumentTypeError(f"unknown {bad!r}; choose from {', '.join(allowed)} (comma list)")
        return items

    return parse


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma list of integers >= 1; '' = none given (the script's default)."""
    return [positive_int(v) for v in text.split(",")] if text else []


def device_arg(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=nonneg_int,
        default=0,
        help="torch CPU threads; 0 = cores not busy at start (cores - round(1-min load)), at least 1",
    )
    p.add_argument("--device", type=device_arg, default="cpu",
                   help="cpu, cuda or cuda:N (CUDA timings synchronise the device)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (time.process_time), robust to other "
        "processes on a shared machine; meaningful with --threads 1 only (spinning threads count too)",
    )
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/NAME.json)")
    p.add_argument("--seed", type=nonneg_int, default=0)


def add_child_args(p: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """Common options of scripts that time ``pgpcl`` child processes: each given one becomes an
    override of every child, and a left-out one stays the child's own default (recorded as null)."""
    p.add_argument("--threads", type=positive_int, default=None,
                   help="train.num_threads for every pgpcl run (default: the run's own, torch's default)")
    p.add_argument("--device", default=None, help="train.device for every pgpcl run (default: the preset's)")
    if seed:
        p.add_argument("--seed", type=nonneg_int, default=None, help="seed= for every pgpcl run (default: the preset's)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/NAME.json)")


def child_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides that apply ``add_child_args``' options; they go last, so they win."""
    out = []
    if args.threads is not None:
        out.append(f"train.num_threads={args.threads}")
    if args.device is not None:
        out.append(f"train.device={args.device}")
    if getattr(args, "seed", None) is not None:
        out.append(f"seed={args.seed}")
    return out


OWNED_KEYS = {"train.num_threads": "--threads", "train.device": "--device", "seed": "--seed"}


def refuse_owned(p: argparse.ArgumentParser, overrides: list[str], args: argparse.Namespace | None = None) -> None:
    """Refuse an override of a key a common option sets, which would make the JSON's option a claim the
    run did not follow. ``args``: only the options given there (not None) own their keys."""
    for text in overrides:
        option = OWNED_KEYS.get(text.split("=", 1)[0].strip())
        if option is not None and (args is None or getattr(args, option[2:], None) is not None):
            p.error(f"override {text!r} sets what {option} sets; give it once, with {option}")


def setup_children(args: argparse.Namespace) -> dict[str, Any]:
    """Machine record for scripts that time child processes (this process sets nothing)."""
    mach = machine(os.getloadavg())
    mach["torch_threads"] = args.threads  # what the children were told; None = their default
    return mach


def check_presets(names: Iterable[str], overrides: list[str], need_pgp: bool = False) -> None:
    """Load every preset with the overrides before any work, so that a bad name or override fails in
    one line at the start rather than after earlier presets have run."""
    from pgpcl.config import load_config
    from pgpcl.errors import ConfigError

    for name in names:
        cfg = load_config(name, overrides)
        if need_pgp and not cfg.pgp.enabled:
            raise ConfigError(f"preset {name!r} has no PGP (pgp.enabled is false); choose a *_pgp preset")


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main; a user error (pgpcl's own, or a failing child) prints one line as argparse
    does (``NAME.py: error: ...``), exit 2. Anything else is a bug and keeps its traceback."""
    from pgpcl.errors import PgpclError

    try:
        main()
    except (PgpclError, ChildFailed) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)


def auto_threads() -> int:
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - round(os.getloadavg()[0])))


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Apply threads / seed; returns the machine record (call before any timing)."""
    load_before = os.getloadavg()
    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    args.threads = threads
    if args.clock == "cpu" and torch.device(args.device).type == "cuda":
        print(f"{Path(sys.argv[0]).name}: error: --clock cpu measures host CPU time; use --clock wall with "
              "--device cuda", file=sys.stderr)
        sys.exit(2)
    set_clock(args.clock)
    return machine(load_before)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni"})
    except OSError:
        pass
    return []


def machine(load_before: tuple[float, float, float] | None = None) -> dict[str, Any]:
    import timm

    rec: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_before": [round(v, 2) for v in (load_before or os.getloadavg())],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return rec


def write_sweep(out: Path, name: str, record: dict[str, Any]) -> None:
    """Write an accuracy sweep's JSON (``record`` plus the command that made it and the UTC date)."""
    record = {**record, "command": " ".join([f"python benchmarks/{name}.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


def finish(name: str, args: argparse.Namespace, mach: dict[str, Any], results: Any, notes: list[str]) -> Path:
    """Record the load after the run and write the JSON; returns its path."""
    mach = {**mach, "load_avg_after": [round(v, 2) for v in os.getloadavg()]}
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([f"benchmarks/{name}.py", *sys.argv[1:]])
    payload = {
        "benchmark": name,
        "command": cmd,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": mach,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
        "notes": notes,
    }
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    threads = mach["torch_threads"] if mach["torch_threads"] is not None else "each child's default"
    print(f"\nmachine: {mach['cpu']} ({mach['cores']} cores, torch threads {threads}), "
          f"load avg before {mach['load_avg_before']} after {mach['load_avg_after']}")
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return out


# ----------------------------------------------------------------------------------------------------
# Timing


_CLOCK: Callable[[], float] = time.perf_counter


def set_clock(kind: str) -> None:
    """'wall' (perf_counter) or 'cpu' (process CPU time) for every timing that follows."""
    global _CLOCK
    _CLOCK = time.process_time if kind == "cpu" else time.perf_counter


def clock() -> float:
    return _CLOCK()


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    sync(device)
    start = _CLOCK()
    fn()
    sync(device)
    return _CLOCK() - start


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin (a, b, a, b, ...), after ``warmup`` rounds.

    Round-robin spreads a load change on a shared machine over all paths instead of one.
    The order inside a round alternates so no path always runs first.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            times[n].append(timed(fns[n], device))
    return times


def med(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def spread(xs: list[float]) -> float:
    """(max - min) / median: a crude noise indicator for a row of repeats."""
    m = med(xs)
    return (max(xs) - min(xs)) / m if m > 0 else 0.0


# ----------------------------------------------------------------------------------------------------
# Memory


def maxrss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own address space.
    (``getrusage().ru_maxrss`` is not used there: a child started with fork/vfork + exec inherits the
    parent's high-water mark, so a benchmark that spawns cases after building models would read its
    own peak as the child's.) Elsewhere ru_maxrss (macOS reports bytes, others KiB).
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def rss_bytes() -> int:
    """Resident set size of this process now (``VmRSS``; 0 where /proc/self/status does not exist)."""
    return _proc_status_bytes("VmRSS") or 0


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of Linux's /proc/self/status in bytes, or None without it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_case_subprocess(script: Path, argv: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``python script argv`` in a fresh interpreter; it prints one JSON line last."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    what = f"{script.name} {' '.join(argv)}"
    try:
        proc = subprocess.run(
            [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{what} ran past {timeout:.0f} s; try smaller settings") from None
    if proc.returncode != 0:
        raise child_failure(what, proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_failure(what: str, proc: subprocess.CompletedProcess) -> ChildFailed:
    """One line for a failed child: its last stderr line, which for pgpcl's CLI is its own one-line
    error. A longer stderr (a traceback: a bug) is kept in a file, named in the line."""
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    msg = f"{what} failed (exit {proc.returncode}): {lines[-1] if lines else 'nothing on stderr'}"
    if len(lines) > 1:
        fd, path = tempfile.mkstemp(prefix="pgpcl-benchmark-", suffix=".stderr")
        with os.fdopen(fd, "w") as f:
            f.write(proc.stderr)
        msg += f" (its whole stderr: {path})"
    return ChildFailed(msg)


def mib(n: float) -> float:
    return n / 2**20


# ----------------------------------------------------------------------------------------------------
# Models


def build_vit(size: str, device: torch.device | str = "cpu", img_size: int = 224):
    """A timm ViT (no head) with random weights, eval mode, frozen."""
    import timm

    vit = timm.create_model(MODELS.get(size, size), pretrained=False, num_classes=0, img_size=img_size)
    vit.requires_grad_(False)
    return vit.eval().to(device)


def set_timm_fused(vit: torch.nn.Module, fused: bool) -> None:
    """timm's own Attention modules (un-prefixed blocks) choose SDPA with ``attn.fused_attn``."""
    for blk in vit.blocks:
        blk.attn.fused_attn = fused


def pgpcl_method(method: str, vit, *, fused: bool = True, **params):
    """pgpcl's L2P or DualPrompt (released default hyper-parameters) on ``vit`` (shared, not copied)."""
    from pgpcl.methods.dualprompt import DualPrompt
    from pgpcl.methods.l2p import L2P
    from pgpcl.models import PromptedViT

    backbone = PromptedViT(vit, fused_attention=fused)  # also sets timm's own blocks' flag
    cls = {"l2p": L2P, "dualprompt": DualPrompt}[method]
    return cls(cls.Params(**params), backbone, NUM_CLASSES, TASK_CLASSES)


def pgpcl_hooks(method, num_samples: int, batch: int, device, seed: int = 0, img_size: int = 224):
    """PGP hooks for ``method`` with a basis built from random images, active as on task 2."""
    from pgpcl.config import PGPConfig
    from pgpcl.engine.pgp_hooks import PGPHooks

    hooks = PGPHooks(method, PGPConfig(enabled=True, num_samples=num_samples), torch.device(device))
    hooks.build_basis(0, random_loader(num_samples, batch, device, seed=seed, img_size=img_size))
    hooks.begin_task(1)
    return hooks


def random_loader(n: int, batch: int, device, seed: int = 0, img_size: int = 224, task: int = 0):
    """A list of (x, y, task) batches of uniform [0, 1] images, like a pgpcl loader yields."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = torch.rand(b, 3, img_size, img_size, generator=g).to(device)
        y = torch.randint(10 * task, 10 * task + 10, (b,), generator=g).to(device)
        out.append((x, y, torch.full((b,), task, dtype=torch.long, device=device)))
    return out


def class_mask(task: int, device) -> torch.Tensor:
    m = torch.zeros(NUM_CLASSES, dtype=torch.bool, device=device)
    m[TASK_CLASSES[task]] = True
    return m


@contextlib.contextmanager
def no_op():
    yield


# ----------------------------------------------------------------------------------------------------
# Tables


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, sep, *body])
