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
        raise PgpclError(f"{run_dir} is not a pgpcl run folder (no config.yaml); give the folder 'pgpcl train' wrote")
    from pgpcl.config import UniqueKeyLoader

    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a key given twice is refused
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = describe(e)
        raise ConfigError(f"{path} cannot be read ({first}); restore it from the run's results.json 'config'") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a YAML mapping; restore it from the run's results.json 'config'")
    return raw


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


def reevaluate_run(run_dir: Path) -> dict:
    """The run's model rebuilt from its config and last end-of-task checkpoint, evaluated again:
    ``{"after_task": t, "num_tasks": T, "cil": [acc % per seen task], "til": [...] or None}`` (til None
    where the setting has no task-aware evaluation, e.g. DIL)."""
    from pgpcl.data import build_scenario
    from pgpcl.engine import checkpoint as ckpt
    from pgpcl.engine.seed import resolve_device, seed_everything
    from pgpcl.engine.trainer import build_method, evaluate_method

    cfg = load_run_config(run_dir)
    ckpt_path = ckpt.latest_checkpoint(run_dir)
    if ckpt_path is None:
        raise PgpclError(f"{run_dir} has no end-of-task checkpoint yet; train at least one task first")
    seed_everything(cfg.seed, cfg.train.deterministic)
    device = resolve_device(cfg.train.device)
    scenario = build_scenario(cfg.data, cfg.seed)
    method = build_method(cfg, scenario).to(device)
    state = ckpt.load_checkpoint(ckpt_path)
    ckpt.check_matches_run(ckpt_path, state, config=cfg.to_dict(), scenario=ckpt.scenario_record(scenario),
                           weights_sha256=ckpt.weights_sha(method), pgp_enabled=cfg.pgp.enabled, run_dir=run_dir)
    task = state["task"]
    method.begin_task(task)  # first, so that whatever it initialises is overwritten by the checkpoint
    ckpt.load_method_state(method, state, ckpt_path)
    method.eval()
    ev = evaluate_method(method, scenario, task, cfg, device, progress=cfg.train.progress,
                         desc=f"eval after task {task + 1}/{scenario.num_tasks}")
    return {"after_task": task, "num_tasks": scenario.num_tasks, "cil": list(ev.cil),
            "til": list(ev.til) if scenario.has_til else None}  # what the run records


def evaluate_run(run_dir: Path) -> list[str]:
    """:func:`reevaluate_run` as printable lines (what ``pgpcl eval`` prints)."""
    ev = reevaluate_run(run_dir)
    lines = [f"{run_dir}: after task {ev['after_task'] + 1}/{ev['num_tasks']}"]
    for setting in ("cil", "til"):
        row = ev[setting]
        if row is not None:
            accs = "  ".join(f"{a:6.2f}" for a in row)
            lines.append(f"{setting.upper()} per task: {accs}   mean {sum(row) / len(row):.2f}")
    return lines
