"""``pgpcl eval RUN_DIR``: rebuild a run's model from its config and last checkpoint and re-evaluate."""

from __future__ import annotations

from pathlib import Path

import yaml

from pgpcl.errors import ConfigError, PgpclError, describe


def load_run_config_raw(run_dir: Path) -> dict:
    """The plain dict in ``run_dir/config.yaml``; PgpclError if the folder is not a run folder."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if run_dir.is_file():
        raise PgpclError(f"{run_dir} is a file, not a run folder; give the folder 'pgpcl train' wrote (RUN_DIR)")
    if not run_dir.is_dir():
        raise PgpclError(f"{run_dir} does not exist; give the folder 'pgpcl train' wrote (RUN_DIR)")
    if not path.exists():
        below = _a_run_below(run_dir)
        hint = f"; it holds run folders, e.g. {below}" if below else ""
        raise PgpclError(f"{run_dir} is not a pgpcl run folder (no config.yaml){hint}; give the folder 'pgpcl train' "
                         "wrote")
    from pgpcl.config import UniqueKeyLoader

    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a key given twice is refused
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = describe(e)
        raise ConfigError(f"{path} cannot be read ({first}); restore it from the run's results.json 'config'") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a YAML mapping; restore it from the run's results.json 'config'")
    return raw


def _a_run_below(folder: Path, depth: int = 3) -> Path | None:
    """The first run folder (holding config.yaml) at most ``depth`` levels below ``folder`` (runs/NAME/seed0)."""
    for level in range(1, depth + 1):
        found = sorted(folder.glob("/".join(["*"] * level) + "/config.yaml"))
        if found:
            return found[0].parent
    return None


def load_run_config(run_dir: Path, raw: dict | None = None):
    """The run's config from ``run_dir/config.yaml`` (``raw``: that file's data, when already read); a
    ConfigError names the file."""
    from pgpcl.config import config_from_dict, with_legacy_values

    raw = load_run_config_raw(run_dir) if raw is None else raw
    try:
        return config_from_dict(with_legacy_values(raw))
    except ConfigError as e:
        raise ConfigError(f"{Path(run_dir) / 'config.yaml'}: {e}") from None


def run_config_difference(run_dir: Path, cfg) -> tuple[str, object, object] | None:
    """First (key, the run's value, ``cfg``'s value) where ``cfg`` differs from the run's config.yaml in
    a key that changes the numbers; None when it trains the same run."""
    from pgpcl.config import config_difference

    return config_difference(load_run_config(run_dir).to_dict(), cfg.to_dict())


def reevaluate_run(run_dir: Path, all_tasks: bool = False) -> dict:
    """The run's model rebuilt from its config and end-of-task checkpoints, evaluated again.

    Returns ``{"after_task": t, "num_tasks": T, "cil": [acc % per seen task], "til": [...] or None}`` for
    the last checkpoint (til None where the setting has no task-aware evaluation, e.g. DIL). With
    ``all_tasks`` every end-of-task checkpoint is evaluated, and ``"acc"`` holds the accuracy matrices
    rebuilt from them (``acc[setting][i][t]``, None where i > t or no checkpoint after task t is kept),
    with ``"metrics"`` computed from those. ``"recorded"`` compares with the run's results.json.
    """
    from pgpcl.data import build_scenario
    from pgpcl.engine import checkpoint as ckpt
    from pgpcl.engine.metrics import tasks_done
    from pgpcl.engine.results import Results
    from pgpcl.engine.seed import resolve_device, seed_everything
    from pgpcl.engine.trainer import build_method

    cfg = load_run_config(run_dir)
    paths = ckpt.task_checkpoints(run_dir)
    if not paths:
        raise PgpclError(f"{run_dir} has no end-of-task checkpoint yet; train at least one task first")
    paths = paths if all_tasks else paths[-1:]
    seed_everything(cfg.seed, cfg.train.deterministic)
    device = resolve_device(cfg.train.device)
    scenario = build_scenario(cfg.data, cfg.seed)
    method = build_method(cfg, scenario).to(device)
    T, settings = scenario.num_tasks, ("cil", "til") if scenario.has_til else ("cil",)
    acc = {s: [[None] * T for _ in range(T)] for s in settings}
    cache: dict = {}  # the frozen queries of the test batches, the same under every checkpoint
    tasks = []
    for path in paths:
        task, ev = _evaluate_checkpoint(method, scenario, cfg, device, path, run_dir, cache)
        tasks.append(task)
        for s in settings:
            for i, a in enumerate(getattr(ev, s)):
                acc[s][i][task] = a
    out = {"after_task": task, "num_tasks": T, "cil": [acc["cil"][i][task] for i in range(task + 1)],
           "til": [acc["til"][i][task] for i in range(task + 1)] if "til" in acc else None}
    recorded = _read_recorded(run_dir)
    # a checkpoint deleted by hand, the final one too: results.json says how many tasks were trained
    trained = tasks_done(recorded.acc["cil"]) if isinstance(recorded, Results) else 0
    out["missing"] = [t for t in range(max(task + 1, trained)) if t not in tasks and (all_tasks or t > task)]
    if all_tasks:
        from pgpcl.engine.metrics import summarize

        out["acc"] = acc
        out["metrics"] = {s: None if out["missing"] else summarize(m) for s, m in acc.items()}
    out["recorded"] = compare_with_recorded(recorded, acc)
    return out


def _read_recorded(run_dir: Path):
    """The run's results.json as Results, or the one-line reason it cannot be read (a str)."""
    from pgpcl.engine.results import RESULTS_FILENAME, read_results

    try:
        return read_results(Path(run_dir) / RESULTS_FILENAME)
    except PgpclError as e:
        return str(e)


def _evaluate_checkpoint(method, scenario, cfg, device, path: Path, run_dir: Path, cache: dict):
    """(task, TaskEval) of the end-of-task checkpoint at ``path``, loaded into ``method``."""
    from pgpcl.engine import checkpoint as ckpt
    from pgpcl.engine.trainer import evaluate_method

    state = ckpt.load_checkpoint(path)
    ckpt.check_matches_run(path, state, config=cfg.to_dict(), scenario=ckpt.scenario_record(scenario),
                           weights_sha256=ckpt.weights_sha(method), pgp_enabled=cfg.pgp.enabled, run_dir=run_dir)
    task = state["task"]
    method.begin_task(task)  # first, so that whatever it initialises is overwritten by the checkpoint
    ckpt.load_method_state(method, state, path)
    method.eval()
    ev = evaluate_method(method, scenario, task, cfg, device, progress=cfg.train.progress, query_cache=cache,
                         desc=f"eval after task {task + 1}/{scenario.num_tasks}")
    return task, ev


def compare_with_recorded(recorded, acc: dict) -> dict:
    """How the re-evaluated entries of ``acc`` compare with the run's results.json (``recorded``: its
    Results, or why it cannot be read): ``{"compared": n entries, "max_abs_diff": points, "differs":
    [(setting, i, t, recorded, now), ...]}``, or ``{"compared": 0, "why": ...}`` where there is nothing
    to compare with."""
    if isinstance(recorded, str):
        return {"compared": 0, "why": recorded}
    recorded = recorded.acc
    n, worst, differs = 0, 0.0, []
    for s, matrix in acc.items():
        kept = recorded.get(s)
        if kept is None:
            continue
        for i, row in enumerate(matrix):
            for t, now in enumerate(row):
                then = kept[i][t]
                if now is None or then is None:
                    continue
                n, diff = n + 1, abs(now - then)
                worst = max(worst, diff)
                if diff > RECORDED_TOLERANCE:
                    differs.append((s, i, t, then, now))
    if n == 0:
        return {"compared": 0, "why": "results.json holds none of the re-evaluated entries"}
    return {"compared": n, "max_abs_diff": worst, "differs": differs}


RECORDED_TOLERANCE = 1e-6
"""Points of accuracy by which a re-evaluated entry may differ from results.json and still match: the
same checkpoint on the same data gives the same counts; another device or thread count may move a tie."""


def evaluate_run(run_dir: Path, all_tasks: bool = False) -> list[str]:
    """:func:`reevaluate_run` as printable lines (what ``pgpcl eval`` prints)."""
    return eval_lines(run_dir, reevaluate_run(run_dir, all_tasks))


def eval_lines(run_dir: Path, ev: dict, with_recorded: bool = True) -> list[str]:
    """The lines of :func:`reevaluate_run`'s dict ``ev``, the comparison with results.json last (left out
    without ``with_recorded``: :func:`recorded_line` gives it)."""
    if "acc" in ev:
        lines = [f"{run_dir}: every end-of-task checkpoint, re-evaluated"]
        for setting, matrix in ev["acc"].items():
            lines += _matrix_lines(setting, matrix, ev["metrics"][setting])
        if ev["missing"]:
            gone = ", ".join(str(t + 1) for t in ev["missing"])
            lines.append(f"no checkpoint after task(s) {gone}: those columns and the metrics are left out")
    else:
        lines = [f"{run_dir}: after task {ev['after_task'] + 1}/{ev['num_tasks']}"]
        for setting in ("cil", "til"):
            row = ev[setting]
            if row is not None:
                accs = "  ".join(f"{a:6.2f}" for a in row)
                lines.append(f"{setting.upper()} per task: {accs}   mean {sum(row) / len(row):.2f}")
    if final_missing(ev):
        last = ev["missing"][-1] + 1
        lines.append(f"results.json records {last} trained tasks but the checkpoint after task {last} is gone: "
                     f"the last one kept is after task {ev['after_task'] + 1}, so these are not the run's final numbers")
    if with_recorded:
        lines.append(recorded_line(ev["recorded"]))
    return lines


def final_missing(ev: dict) -> bool:
    """Whether the checkpoint after the last task results.json records is gone (deleted by hand)."""
    return bool(ev["missing"]) and ev["missing"][-1] > ev["after_task"]


def eval_verdict(ev: dict) -> int:
    """``pgpcl eval``'s exit status: 0 when the re-evaluated entries match results.json; 1 when one
    differs, when nothing could be compared, or when the final checkpoint is gone (a middle one deleted
    only leaves its column out)."""
    cmp = ev["recorded"]
    return 1 if cmp["compared"] == 0 or cmp["differs"] or final_missing(ev) else 0


def _matrix_lines(setting: str, matrix: list, metrics: dict | None) -> list[str]:
    """The accuracy matrix, a row per task i, a column per checkpoint t, and the metrics from it."""
    T = len(matrix)
    lines = [f"{setting.upper()} accuracy (%), row: task, column: after task", "        "
             + "".join(f"{t + 1:>8}" for t in range(T))]
    for i, row in enumerate(matrix):
        lines.append(f"task {i + 1:<3}" + "".join("       -" if a is None else f"{a:8.2f}" for a in row))
    if metrics is not None:
        names = (("final_acc", "final acc"), ("avg_inc_acc", "avg inc acc"), ("forgetting", "forgetting"),
                 ("bwt", "BWT"))
        shown = [f"{label} {metrics[k]:.2f}" for k, label in names if metrics.get(k) is not None]
        lines.append(f"{setting.upper()}: " + "  ".join(shown))
    return lines


def recorded_line(cmp: dict) -> str:
    if cmp["compared"] == 0:
        return f"not compared with results.json: {cmp['why']}"
    if not cmp["differs"]:
        return f"results.json: all {cmp['compared']} re-evaluated entries match (max |difference| {cmp['max_abs_diff']:.2g} points)"
    s, i, t, then, now = cmp["differs"][0]
    return (f"results.json: {len(cmp['differs'])} of {cmp['compared']} re-evaluated entries differ, by up to "
            f"{cmp['max_abs_diff']:.2f} points (e.g. {s.upper()} task {i + 1} after task {t + 1}: {then:.2f} "
            f"recorded, {now:.2f} now)")
