"""``pgpcl eval RUN_DIR``: rebuild a run's model from its config and last checkpoint and re-evaluate."""

from __future__ import annotations

from pathlib import Path

import yaml

from pgpcl.errors import PgpclError


def load_run_config(run_dir: Path):
    from pgpcl.config import config_from_dict

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise PgpclError(f"{run_dir} is not a pgpcl run folder (no config.yaml); give the folder 'pgpcl train' wrote")
    return config_from_dict(yaml.safe_load(path.read_text()))


def evaluate_run(run_dir: Path) -> list[str]:
    """Returns printable lines: accuracy per seen task in CIL and TIL after the last checkpointed task."""
    from pgpcl.data import build_scenario
    from pgpcl.engine.checkpoint import latest_checkpoint, load_checkpoint
    from pgpcl.engine.seed import resolve_device, seed_everything
    from pgpcl.engine.trainer import build_method, evaluate_method

    cfg = load_run_config(run_dir)
    ckpt_path = latest_checkpoint(run_dir)
    if ckpt_path is None:
        raise PgpclError(f"{run_dir} has no checkpoint yet; train at least one task first")
    seed_everything(cfg.seed, cfg.train.deterministic)
    device = resolve_device(cfg.train.device)
    scenario = build_scenario(cfg.data, cfg.seed)
    method = build_method(cfg, scenario).to(device)
    state = load_checkpoint(ckpt_path)
    method.load_trainable_state_dict(state["method"])
    task = int(state["task"])
    method.begin_task(task)
    method.eval()
    ev = evaluate_method(method, scenario, task, cfg, device)
    lines = [f"{run_dir}: after task {task + 1}/{scenario.num_tasks}"]
    for setting, row in (("CIL", ev.cil), ("TIL", ev.til)):
        accs = "  ".join(f"{a:6.2f}" for a in row)
        lines.append(f"{setting} per task: {accs}   mean {sum(row) / len(row):.2f}")
    return lines
