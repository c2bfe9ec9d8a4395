"""Command-line entry: ``pgpcl train|eval|configs|report|...`` (also ``python -m pgpcl``).

User errors print one line ``pgpcl: error: ...`` and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgpcl import __version__
from pgpcl.errors import PgpclError


def _cmd_train(args: argparse.Namespace) -> int:
    from pgpcl.config import load_config
    from pgpcl.engine.trainer import default_run_dir, train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    results = train(cfg, run_dir, overwrite=args.overwrite)
    _print_summary(results, run_dir)
    return 0


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
    from pgpcl.engine.evaluate import evaluate_run

    for line in evaluate_run(Path(args.run_dir)):
        print(line)
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from pgpcl.config import dump_yaml, list_presets, load_config

    if args.name:
        print(dump_yaml(load_config(args.name)), end="")
        return 0
    for name in list_presets():
        print(name)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pgpcl.report import report_runs

    out = Path(args.out) if args.out else None
    print(report_runs(args.runs, out_dir=out, plots=not args.no_plots, fmt=args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgpcl",
        description="Continual learning with Prompt Gradient Projection (L2P, DualPrompt, CLIP; with and without PGP).",
    )
    parser.add_argument("--version", action="version", version=f"pgpcl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a config through its task sequence")
    p.add_argument("config", help="preset name (see 'pgpcl configs') or path to a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=1 pgp.enabled=true")
    p.add_argument("--run-dir", help="output folder (default: OUTPUT_DIR/NAME/seedSEED)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a run's last checkpoint on every task it has seen")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("configs", help="list presets, or print one resolved preset")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("report", help="tables (mean +- std over seeds) and plots from run folders")
    p.add_argument("runs", nargs="+", help="run folders or results.json files")
    p.add_argument("--out", help="folder for plots and summary.json")
    p.add_argument("--format", choices=["text", "markdown"], default="text")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except PgpclError as e:
        if args.debug:
            raise
        print(f"pgpcl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pgpcl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
