"""Command-line entry: ``pgpcl train|eval|configs|report|...`` (also ``python -m pgpcl``).

User errors print one line ``pgpcl: error: ...`` and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

from pgpcl import __version__
from pgpcl.errors import ConfigError, PgpclError, allocation_failure, one_line


def _cmd_train(args: argparse.Namespace) -> int:
    from pgpcl.config import load_config
    from pgpcl.engine.trainer import default_run_dir, train

    if args.resume:
        return _cmd_resume(args)
    if not args.config:
        raise PgpclError("give a config (a preset name or a YAML path), or --resume RUN_DIR to continue a run")
    if args.run_dir is not None and not args.run_dir.strip():
        raise PgpclError("--run-dir is empty; give a folder, or leave it out for OUTPUT_DIR/NAME/seedSEED")
    if args.keep_going and args.overwrite:
        raise PgpclError("--continue keeps what a run folder holds and --overwrite replaces it; give one of them")
    if args.seeds:
        return _train_seeds(args)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    if args.keep_going:
        from pgpcl.engine.trainer import continue_training

        results, plan = continue_training(cfg, run_dir)
        if _is_main_process() and plan == "keep":
            print(f"{run_dir} already holds this finished run; nothing to train")
    else:
        results = train(cfg, run_dir, overwrite=args.overwrite)
    if _is_main_process():
        _print_summary(results, run_dir)
    return 0


_PLAN_WORDS = {"keep": "finished, kept", "resume": "unfinished, resuming", "start": "new"}


def _train_seeds(args: argparse.Namespace) -> int:
    """``pgpcl train CONFIG --seeds 0 1 2``: one run per seed, one after another, then their report."""
    from pgpcl.config import load_config
    from pgpcl.engine.rundir import check_run_dir
    from pgpcl.engine.trainer import continue_plan, continue_training, default_run_dir, train
    from pgpcl.report import report_runs

    seeds, overrides = split_seeds(args.seeds, args.overrides)
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise PgpclError("--seeds sets each run's seed; drop the seed=... override")
    if len(set(seeds)) != len(seeds):
        raise PgpclError(f"--seeds lists a seed twice ({' '.join(map(str, seeds))}); give each once")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise PgpclError("--seeds trains in one process; under torchrun start one job per seed with seed=N")
    cfgs = [load_config(args.config, [*overrides, f"seed={s}"]) for s in seeds]
    run_dirs = [Path(args.run_dir) / f"seed{s}" if args.run_dir else default_run_dir(c) for s, c in zip(seeds, cfgs)]
    # every folder before the first run: no refusal after hours of training
    plans = [continue_plan(c, d) if args.keep_going else check_run_dir(d, overwrite=args.overwrite)
             for c, d in zip(cfgs, run_dirs)]
    for seed, cfg, run_dir, plan in zip(seeds, cfgs, run_dirs, plans):
        if args.keep_going:
            print(f"seed {seed} ({len(run_dirs)} seeds): {run_dir} ({_PLAN_WORDS[plan]})")
            results, _ = continue_training(cfg, run_dir)
        else:
            print(f"seed {seed} ({len(run_dirs)} seeds): {run_dir}")
            results = train(cfg, run_dir, overwrite=args.overwrite)
        _print_summary(results, run_dir)
    print()
    print(report_runs(run_dirs, plots=False), end="")
    print(f"plots and summary.json: pgpcl report {' '.join(shlex.quote(str(d)) for d in run_dirs)}")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from pgpcl.engine.results import RESULTS_FILENAME, read_results
    from pgpcl.engine.rundir import run_status
    from pgpcl.engine.trainer import resume_config, train

    run_dir = Path(args.resume)
    if args.run_dir or args.overwrite or args.seeds or args.keep_going:
        raise PgpclError("--resume takes the run folder itself and never overwrites it; drop --run-dir / --overwrite"
                         " / --seeds / --continue (resume each seed's folder on its own, or give the config and "
                         "--seeds with --continue)")
    overrides = ([args.config] if args.config else []) + list(args.overrides)
    stray = [o for o in overrides if "=" not in o]
    if stray:
        raise PgpclError(
            f"with --resume the config comes from {run_dir / 'config.yaml'}; drop '{stray[0]}' "
            "(only key=value overrides such as train.device=... are accepted)"
        )
    cfg = resume_config(run_dir, overrides)
    if run_status(run_dir) == "complete":
        if _is_main_process():
            results = read_results(run_dir / RESULTS_FILENAME)  # first: a foreign or damaged file is refused
            print(f"{run_dir} is already complete; nothing to resume")
            _print_summary(results, run_dir)
        return 0
    results = train(cfg, run_dir, resume=True)
    if _is_main_process():
        _print_summary(results, run_dir)
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_summary(results, run_dir: Path) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    for setting, m in results.metrics.items():
        if m is None:
            continue
        print(
            f"{setting.upper()}: final acc {fmt(m['final_acc'])}  avg inc acc {fmt(m['avg_inc_acc'])}  "
            f"forgetting {fmt(m['forgetting'])}  BWT {fmt(m['bwt'])}"
        )
    print(f"results: {run_dir / 'results.json'}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from pgpcl.engine.evaluate import eval_lines, eval_verdict, recorded_line, reevaluate_run

    if not args.run_dir.strip():  # Path("") is the current folder
        raise PgpclError("an empty run folder was given; name the folder 'pgpcl train' wrote (RUN_DIR)")
    ev = reevaluate_run(Path(args.run_dir), all_tasks=args.all)
    uncompared = ev["recorded"]["compared"] == 0
    print(json.dumps(ev) if args.json else "\n".join(eval_lines(Path(args.run_dir), ev, with_recorded=not uncompared)))
    if uncompared:  # on stderr, so that --json output stays one JSON document
        print(f"pgpcl: eval: {recorded_line(ev['recorded'])}", file=sys.stderr)
    return eval_verdict(ev)  # a script can tell a re-evaluation that disagrees or could not be checked


def _cmd_configs(args: argparse.Namespace) -> int:
    from pgpcl.config import dump_yaml, list_presets, load_config

    if args.name and args.names:
        raise PgpclError(f"--names lists every preset; drop it to print {args.name}")
    if args.name:
        print(dump_yaml(load_config(args.name)), end="")
        return 0
    if args.names:
        print("\n".join(list_presets()))
        return 0
    print(_preset_table([_load_preset(name) for name in list_presets()]))
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from pgpcl.config import import_modules
    from pgpcl.data import DATASETS

    import_modules(args.imports)
    print(dataset_table(DATASETS))
    return 0


def dataset_table(registry) -> str:
    """One line per registered reader: its name and the first sentence of its docstring."""
    rows = []
    for name in registry.names():
        doc = " ".join((registry.get(name).__doc__ or "").split()).replace("``", "")
        rows.append((name, doc.split(". ")[0].rstrip(".")))
    width = max(len(n) for n, _ in rows)
    return "\n".join(f"{n.ljust(width)}  {d}".rstrip() for n, d in rows)


def _load_preset(name: str):
    from pgpcl.config import load_config

    try:
        return load_config(name)
    except PgpclError as e:  # a preset added to configs/ whose method is not imported, say
        raise PgpclError(f"preset {name} does not load: {e}") from None


def _preset_table(configs) -> str:
    """One line per preset: what it trains, on what, for how long."""
    head = ("preset", "method", "PGP", "dataset", "tasks", "epochs", "backbone", "weights")
    rows = [head] + [
        (c.name, c.method.name, "yes" if c.pgp.enabled else "-", c.data.dataset, str(c.data.num_tasks),
         str(c.train.epochs), _backbone_label(c.backbone), _weights_label(c.backbone))
        for c in configs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _backbone_label(backbone) -> str:
    """The architecture as built: a builtin file brings its own, size overrides change the arch's."""
    keys = {"img_size": "{} px", "patch_size": "patch {}", "embed_dim": "D={}", "depth": "{} blocks"}
    arch, sizes = backbone.arch, {k: getattr(backbone, k) for k in keys}
    if str(backbone.weights).startswith("builtin:"):
        arch, kwargs = _builtin_arch(backbone.weights.removeprefix("builtin:"))
        sizes = {k: kwargs.get(k) for k in keys}
    given = [keys[k].format(v) for k, v in sizes.items() if v is not None]
    if not given:
        return arch
    # the timm name's patch and image size no longer hold: name what was set, on the arch's other defaults
    return f"ViT ({', '.join(given)})" if len(given) == len(keys) else f"{arch} ({', '.join(given)})"


@functools.cache
def _builtin_arch(name: str) -> tuple[str, dict]:
    """Once per name: resolving checks the file's sha256, and a dozen presets share one builtin file."""
    from pgpcl.models.weights import resolve_builtin

    return resolve_builtin(name)[:2]


def _weights_label(backbone) -> str:
    if backbone.weights is None:
        return "random"
    if backbone.weights == "hub":
        return f"hub ({backbone.pretrained_tag})" if backbone.pretrained_tag else "hub"
    return backbone.weights


def _cmd_report(args: argparse.Namespace) -> int:
    from pgpcl.report import report_runs

    if any(not p.strip() for p in args.runs):
        raise PgpclError("an empty path was given; name run folders, results.json files or folders holding them")
    if args.out is not None and not args.out.strip():
        raise PgpclError("--out is empty; give a folder, or leave it out for the default")
    out = Path(args.out) if args.out else None
    print(report_runs(args.runs, out_dir=out, plots=not args.no_plots, fmt=args.format))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pgpcl.demo import DEFAULT_SEEDS, run_demo

    if not args.out.strip():
        raise PgpclError("--out is empty; give a folder, or leave it out for runs/demo")
    seeds, overrides = split_seeds(args.seeds or [], args.overrides)
    seeds = seeds or ([0] if args.quick else list(DEFAULT_SEEDS))
    methods = demo_methods(args.methods)
    print(run_demo(Path(args.out), seeds=seeds, quick=args.quick, overwrite=args.overwrite, extra=overrides,
                   methods=methods))
    return 0


def demo_methods(text: str) -> tuple[str, ...]:
    """``--methods``: 'all', or comma-separated learner names."""
    from pgpcl.demo import METHODS

    return METHODS if text == "all" else tuple(m.strip() for m in text.split(",") if m.strip())


def split_seeds(given: list[str], overrides: list[str]) -> tuple[list[int], list[str]]:
    """``--seeds 0 1 pgp.eps=0.9``: argparse hands the override to --seeds, which takes any number of
    values; an argument with '=' is an override wherever it stands."""
    seeds = []
    for value in given:
        if "=" in value:
            overrides = [*overrides, value]
        elif value.lstrip("-").isdigit():
            seeds.append(int(value))
        else:
            raise PgpclError(f"--seeds takes integers, got {value!r}; e.g. --seeds 0 1 2")
    return seeds, overrides


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import json

    from pgpcl.pretrain import PretrainConfig, pretrain

    if not args.out.strip():  # Path("") is the current folder: an empty --out is a slip, not a choice
        raise PgpclError("--out is empty; give a folder, or leave it out for pretrained")
    cfg = PretrainConfig(name=args.name, epochs=args.epochs, seed=args.seed, root=args.data_root)
    record = pretrain(cfg, Path(args.out), overwrite=args.overwrite)
    print(json.dumps({k: record[k] for k in ("sha256", "params", "fashion_mnist_test_acc", "train_seconds")}))
    print(f"weights: {Path(args.out) / (args.name + '.safetensors')} (use backbone.weights=PATH)")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors in pgpcl's one-line form (argparse prints the whole usage first); the command
    parsers are of this class too (add_subparsers makes them of the parser's own class)."""

    def error(self, message: str):
        self.exit(2, f"pgpcl: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="pgpcl",
        description="Continual learning with Prompt Gradient Projection: L2P, DualPrompt, CODA-Prompt, LoRA, adapters and "
        "prefix-tuning on a ViT, and a CLIP prompt learner (with adapters, LoRA or prefixes), each with and without PGP.",
    )
    parser.add_argument("--version", action="version", version=f"pgpcl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a config through its task sequence (multi-GPU: torchrun --nproc_per_node=N -m pgpcl train ...)",
        description="Train a config through its task sequence. Checkpoints go to RUN_DIR/checkpoints after "
        "every task and every train.checkpoint_every steps; Ctrl+C saves one and exits 130; --resume "
        "continues. Under torchrun each process trains on its slice of every global batch of "
        "train.batch_size (the batch size is global, not per process).",
    )
    p.add_argument("config", nargs="?", help="preset name (see 'pgpcl configs') or path to a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=1 pgp.enabled=true")
    p.add_argument("--run-dir", help="output folder (default: OUTPUT_DIR/NAME/seedSEED)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    p.add_argument("--seeds", nargs="+", action="extend", metavar="SEED",
                   help="one run per seed, one after another (folders OUTPUT_DIR/NAME/seedSEED, or RUN_DIR/seedSEED "
                        "with --run-dir), then their report: mean +- std over the seeds")
    p.add_argument("--continue", dest="keep_going", action="store_true",
                   help="train only what is missing: keep a finished run of this config, resume an unfinished one "
                        "from its last checkpoint, start one where there is none (the same command starts a job "
                        "and, run again after a crash or preemption, finishes it; with --seeds: every seed)")
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, with its own config.yaml (overrides may "
        "only change where/how it runs: data.root, data.num_workers, train.device, train.progress, ...)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a run's last checkpoint on every task it has seen (--all: "
                                     "every checkpoint, the whole accuracy matrix), against its results.json",
                       description="Rebuild the run's model from its config.yaml and end-of-task checkpoints, "
                                   "evaluate it again on the test sets, and compare with the accuracies "
                                   "results.json recorded.")
    p.add_argument("run_dir")
    p.add_argument("--all", action="store_true",
                   help="evaluate every end-of-task checkpoint: the accuracy matrices and their metrics")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("configs", help="list presets (method, data, backbone), or print one resolved preset")
    p.add_argument("name", nargs="?")
    p.add_argument("--names", action="store_true", help="preset names only, one per line")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("datasets", help="list the dataset readers (data.dataset names) and what each reads")
    p.add_argument("--imports", nargs="*", default=[], metavar="MODULE",
                   help="also import these modules first (readers of your own, as the config's imports)")
    p.set_defaults(func=_cmd_datasets)

    p = sub.add_parser("demo", help="offline demo: L2P, DualPrompt (--methods: also CODA-Prompt, LoRA, adapters, prefix), "
                                     "each +-PGP, several seeds, on MNIST digits")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every demo run")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--seeds", nargs="+", action="extend", metavar="SEED", help="seeds (default: 0 1 2; --quick: 0)")
    p.add_argument("--quick", action="store_true", help="fewer images and one seed: under a minute")
    p.add_argument("--overwrite", action="store_true", help="retrain runs that already finished")
    p.add_argument("--methods", default="l2p,dualprompt", metavar="A,B",
                   help="learners, each with and without PGP, comma-separated from l2p, dualprompt, coda_prompt, "
                        "lora, adapter, prefix; or all (default: l2p,dualprompt)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pretrain", help="pretrain the small offline ViT on Fashion-MNIST")
    p.add_argument("--out", default="pretrained", help="folder for NAME.safetensors and NAME.json (default: %(default)s)")
    p.add_argument("--name", default="vit_fmnist_d96", help="file name of the weights (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=6, help="passes over the 60k training images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the batch order and the shifts (default: %(default)s)")
    p.add_argument("--data-root", help="Fashion-MNIST folder (default: Debian's dataset-fashion-mnist)")
    p.add_argument("--overwrite", action="store_true", help="replace NAME.safetensors / NAME.json in --out")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("report", help="tables (mean +- std over seeds) and plots from run folders")
    p.add_argument("runs", nargs="+", help="run folders, results.json files, or folders holding runs (searched)")
    p.add_argument("--out", help="folder for plots and summary.json (replaces the files of a previous report there; default: "
                        "RUN/report for one run, else ./report)")
    p.add_argument("--format", choices=["text", "markdown"], default="text",
                   help="how the tables print (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true",
                   help="no PNG plots; without --out nothing is written, only printed")
    p.set_defaults(func=_cmd_report)
    return parser


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of ``pgpcl COMMAND`` (its errors point at ``pgpcl COMMAND --help``)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # also accepted after the command: pgpcl train ... --debug
        args.debug = True
        extra = [e for e in extra if e != "--debug"]
    if extra:
        # key=value overrides may also follow options (pgpcl train CONFIG --run-dir D a.b=1)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            command = parser if args.command is None else _command_parser(parser, args.command)
            command.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with warnings.catch_warnings():  # restores the formatter for a caller of main() (tests, scripts)
            if not args.debug:
                warnings.showwarning = _OneLineWarnings()
            code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is met inside this try, not at exit
        return code
    except PgpclError as e:
        if args.debug:
            raise
        if _said_by_rank_0(e):
            # rank 0 meets the same error and says it; once it exits torchrun stops this process. Exiting at
            # once instead could let torchrun stop rank 0 before it printed; if rank 0 never exits, say it here.
            import time

            time.sleep(RANK_0_GRACE_S)
        print(f"pgpcl: error: {_rank_prefix()}{one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (pgpcl report | head -1): stop quietly
        if args.debug or args.command in ("train", "demo", "pretrain"):
            raise  # a closed pipe stopped training: say so, with where
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not raise again
        return 141  # 128 + SIGPIPE, as a shell reports a command stopped by a closed pipe
    except Exception as e:
        # Only raised once the engine is imported, so these imports cost nothing.
        from pgpcl.engine.distributed import PeerFailed
        from pgpcl.engine.trainer import Interrupted

        if isinstance(e, Interrupted):  # Ctrl+C / SIGTERM: progress saved, one line on how to resume
            if _is_main_process():
                print(f"pgpcl: {e}", file=sys.stderr)
            return e.exit_code
        if isinstance(e, PeerFailed) and not args.debug:  # another torchrun process failed and said why
            return 2
        asked = allocation_failure(e)
        if asked is not None and not args.debug:  # outside a run, which says more itself
            print(f"pgpcl: error: {_rank_prefix()}out of memory ({asked}); lower the batch "
                  "or model sizes, or free memory", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:  # Ctrl+C outside training, whose own handler saves a checkpoint
        print(INTERRUPTED, file=sys.stderr)
        return 130


INTERRUPTED = "pgpcl: interrupted; every file already written is whole (files are written atomically)"


class _OneLineWarnings:
    """``warnings.showwarning`` for the commands: a library's warning as one line, each text once. Python's
    default adds the warning's source line, and torch's DataLoader warnings span several lines and come
    twice, from two places (--debug keeps the default format)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text in self.seen:
            return
        self.seen.add(text)
        try:  # as Python's own: a warning must not fail the command when stderr is gone
            print(f"pgpcl: warning: {text} ({category.__name__} from {os.path.basename(filename)}:{lineno})",
                  file=sys.stderr if file is None else file)
        except (OSError, ValueError):
            pass


def _exit_on_early_interrupt(signum: int, frame: object) -> None:
    """SIGINT in the main process outside training: exit at once.

    A KeyboardInterrupt raised while torch's extension modules are still being imported can leave the
    interpreter broken (segfaults, 'duplicate registrations'); there is nothing to save at that point.
    Loader worker processes inherit this handler and keep Python's behaviour (torch stops them quietly).
    """
    if os.getpid() != _MAIN_PID:
        raise KeyboardInterrupt
    os.write(2, (INTERRUPTED + "\n").encode())
    os._exit(130)


_MAIN_PID = os.getpid()


RANK_0_GRACE_S = 20.0
"""How long a rank other than 0 waits, after a config error every rank meets, for rank 0 to say it."""


def _said_by_rank_0(e: PgpclError) -> bool:
    """Under torchrun, a config error met before the process group starts is met by every rank alike (each
    reads the same command line and presets): rank 0 says it, the others wait to be stopped. Other errors a
    rank meets before the group starts (a run folder another node cannot see) are its own, and it says them."""
    if _is_main_process() or os.environ.get("WORLD_SIZE", "1") == "1" or not isinstance(e, ConfigError):
        return False
    from pgpcl.engine.distributed import group_joined

    return not group_joined()


def _rank_prefix() -> str:
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank not in (None, "0") and os.environ.get("WORLD_SIZE", "1") != "1" else ""


def entry() -> None:
    """Process entry point (``pgpcl`` and ``python -m pgpcl``): :func:`main`, then exit with its code.

    Under torchrun the process ends with ``os._exit`` once everything is written and flushed:
    DistributedDataParallel keeps the process group alive past ``destroy_process_group`` (torch
    2.14: its gloo threads outlive the call), and tearing it down during interpreter exit now and then
    aborts (SIGABRT, "terminate called without an active exception"), which fails a finished job.
    """
    signal.signal(signal.SIGINT, _exit_on_early_interrupt)  # training installs its own, then restores this
    code = main()
    from pgpcl.engine.distributed import launched_world_size

    if launched_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
