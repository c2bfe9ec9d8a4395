"""The task loop: train each task, build PGP bases, evaluate on every seen task, write results.

Order of a training step (as released): forward, loss, backward, clip grad norm, project, optimizer step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from pgpcl.config import Config, dump_yaml
from pgpcl.engine.checkpoint import save_task_checkpoint
from pgpcl.engine.results import write_results
from pgpcl.engine.rundir import prepare_run_dir
from pgpcl.engine.seed import resolve_device, seed_everything
from pgpcl.errors import PgpclError
from pgpcl.io import atomic_write_text


@dataclass
class TaskEval:
    """Accuracy (%) on each seen task after training one task."""

    cil: list[float] = field(default_factory=list)
    til: list[float] = field(default_factory=list)


def build_method(cfg: Config, scenario):
    from pgpcl.methods import METHODS

    return METHODS.get(cfg.method.name).build(cfg, scenario)


def make_optimizer(params, cfg: Config, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(t.betas), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=weight_decay)


def effective_lr(cfg: Config, lr: float) -> float:
    return lr * cfg.train.batch_size / 256 if cfg.train.lr_scale_by_batch else lr


class Trainer:
    """Runs one config through its whole task sequence into ``run_dir``."""

    def __init__(self, cfg: Config, run_dir: Path, *, overwrite: bool = False):
        from pgpcl.data import build_scenario

        self.cfg = cfg
        self.run_dir = prepare_run_dir(run_dir, overwrite=overwrite)
        seed_everything(cfg.seed, cfg.train.deterministic)
        self.device = resolve_device(cfg.train.device)
        self.scenario = build_scenario(cfg.data, cfg.seed)
        self.method = build_method(cfg, self.scenario).to(self.device)
        self.pgp = self._build_pgp()
        self.results = self._new_results()
        self.tb = self._tensorboard()
        atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))

    # -- set-up ------------------------------------------------------------------------------------
    def _build_pgp(self):
        if not self.cfg.pgp.enabled:
            return None
        from pgpcl.engine.pgp_hooks import PGPHooks

        return PGPHooks(self.method, self.cfg.pgp, self.device)

    def _new_results(self):
        from pgpcl.engine.results import new_results

        info = getattr(self.method, "weights_info", None)
        sc = self.scenario
        return new_results(
            self.cfg,
            num_tasks=sc.num_tasks,
            class_order=sc.class_order,
            task_classes=sc.task_classes,
            class_names=sc.class_names,
            weights={"source": getattr(info, "source", None), "sha256": getattr(info, "sha256", None)},
            device=str(self.device),
            eval_til=self.cfg.data.setting != "dil",
        )

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PgpclError("train.tensorboard=true needs tensorboard: pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # -- the loop ----------------------------------------------------------------------------------
    def run(self):
        for task in range(self.scenario.num_tasks):
            self.run_task(task)
        self.results.mark("complete")
        self._write()
        if self.tb is not None:
            self.tb.close()
        return self.results

    def run_task(self, task: int) -> None:
        method, timing = self.method, {"task": task, "basis_s": 0.0}
        method.begin_task(task)
        if self.pgp is not None and method.basis_timing == "task_start":
            timing["basis_s"] += self._build_basis(task)
        if self.pgp is not None:
            self.pgp.begin_task(task)
        timing.update(self.train_task(task))
        if self.pgp is not None:
            for group, rec in self.pgp.end_task(task).items():
                self.results.add_projection(task, group, rec["rank"], rec["dim"], rec["leak"])
        if self.pgp is not None and method.basis_timing == "task_end":
            timing["basis_s"] += self._build_basis(task)
        method.end_task(task)
        start = time.perf_counter()
        ev = self.evaluate(task)
        timing["eval_s"] = time.perf_counter() - start
        self._record(task, ev, timing)
        save_task_checkpoint(self.run_dir, task, method, self.pgp, self.results)
        self._write()

    def _build_basis(self, task: int) -> float:
        start = time.perf_counter()
        p = self.cfg.pgp
        loader = self.scenario.sample_loader(
            task, p.num_samples, p.sample_batch_size, seed=self.cfg.seed + 1000 * task, augment=p.sample_augment
        )
        self.pgp.build_basis(task, loader)
        return time.perf_counter() - start

    # -- training ----------------------------------------------------------------------------------
    def train_task(self, task: int) -> dict:
        cfg, method = self.cfg, self.method
        lr, wd = method.task_optimizer_settings(task, cfg.train.lr, cfg.train.weight_decay)
        params = method.trainable_parameters()
        optimizer = make_optimizer(params, cfg, effective_lr(cfg, lr), wd)
        epochs = 1 if self.scenario.online else cfg.train.epochs
        loader_len = len(self.scenario.train_loader(task, cfg.train.batch_size, generator_seed=0))
        total = epochs * loader_len
        if cfg.train.max_steps_per_task is not None:
            total = min(total, cfg.train.max_steps_per_task)
        scheduler = None
        if cfg.train.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
        class_mask = self.scenario.class_mask(task).to(self.device)
        method.train()
        steps, images, start = 0, 0, time.perf_counter()
        bar = _progress(total, f"task {task + 1}/{self.scenario.num_tasks} train", cfg.train.progress)
        for epoch in range(epochs):
            seed = cfg.seed * 7919 + task * 101 + epoch
            for x, y, t in self.scenario.train_loader(task, cfg.train.batch_size, generator_seed=seed):
                if steps >= total:
                    break
                loss, correct = self.train_step(x, y, t, class_mask, optimizer, params)
                if scheduler is not None:
                    scheduler.step()
                steps, images = steps + 1, images + len(y)
                self._log_step(bar, task, steps, loss, correct / len(y))
        bar.close()
        elapsed = time.perf_counter() - start
        return {"train_s": elapsed, "steps": steps, "images": images}

    def train_step(self, x: Tensor, y: Tensor, t: Tensor, class_mask: Tensor, optimizer, params) -> tuple[float, int]:
        x, y, t = (v.to(self.device, non_blocking=True) for v in (x, y, t))
        with self._autocast():
            out = self.method(x, t)
            loss = self.method.loss(out, y, class_mask)
        if not torch.isfinite(loss):
            raise PgpclError(
                f"training loss became {loss.item()} at task {self.method.current_task}; the last good "
                f"checkpoint is in {self.run_dir / 'checkpoints'}; lower train.lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.clip_grad)
        if self.pgp is not None:
            self.pgp.before_step()  # target=gradient: projects the gradients here
        optimizer.step()
        if self.pgp is not None:
            self.pgp.after_step()
        masked = out.logits.detach().masked_fill(~class_mask, float("-inf"))
        return loss.item(), int((masked.argmax(1) == y).sum())

    def _autocast(self):
        if self.cfg.train.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _log_step(self, bar, task: int, step: int, loss: float, acc: float) -> None:
        bar.update(1)
        if step % max(self.cfg.train.log_every, 1) == 0 or step == 1:
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * acc:.1f}")
            if self.tb is not None:
                global_step = task * 1_000_000 + step
                self.tb.add_scalar(f"train/loss_task{task}", loss, global_step)
                self.tb.add_scalar(f"train/acc_task{task}", acc, global_step)

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, after_task: int) -> TaskEval:
        """CIL: argmax over all classes seen so far, no task id; TIL: argmax within the true task's classes."""
        self.method.eval()
        return evaluate_method(self.method, self.scenario, after_task, self.cfg, self.device)

    def _record(self, task: int, ev: TaskEval, timing: dict) -> None:
        r = self.results
        for setting, row in (("cil", ev.cil), ("til", ev.til)):
            if r.acc.get(setting) is None:
                continue
            for i, value in enumerate(row):
                r.set_acc(setting, i, task, value)
        r.refresh_metrics()
        r.add_timing(task, timing["train_s"], timing["eval_s"], timing["basis_s"], timing["steps"], timing["images"])
        if self.pgp is not None:
            r.extra["basis"] = self.pgp.basis_log
        if self.tb is not None:
            for setting, m in r.metrics.items():
                if m is not None:
                    self.tb.add_scalar(f"eval/{setting}_avg_acc", m["final_acc"], task)

    def _write(self) -> None:
        write_results(self.run_dir / "results.json", self.results)


@torch.no_grad()
def evaluate_method(method, scenario, after_task: int, cfg: Config, device: torch.device) -> TaskEval:
    seen = torch.zeros(scenario.num_classes, dtype=torch.bool, device=device)
    for i in range(after_task + 1):
        seen |= scenario.class_mask(i).to(device)
    ev = TaskEval()
    for i in range(after_task + 1):
        task_mask = scenario.class_mask(i).to(device)
        correct_cil = correct_til = count = 0
        for x, y, _ in scenario.test_loader(i, cfg.train.eval_batch_size):
            x, y = x.to(device), y.to(device)
            logits = method.predict(x).float()
            correct_cil += int((logits.masked_fill(~seen, float("-inf")).argmax(1) == y).sum())
            correct_til += int((logits.masked_fill(~task_mask, float("-inf")).argmax(1) == y).sum())
            count += len(y)
        if count == 0:
            raise PgpclError(f"task {i} has no test images; check data.test_per_class and the dataset files")
        ev.cil.append(100.0 * correct_cil / count)
        ev.til.append(100.0 * correct_til / count)
    return ev


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def default_run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / cfg.name / f"seed{cfg.seed}"


def train(cfg: Config, run_dir: str | Path | None = None, *, overwrite: bool = False):
    """Train ``cfg`` end to end; returns the :class:`Results` (also written to ``run_dir/results.json``)."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    return Trainer(cfg, run_dir, overwrite=overwrite).run()


__all__ = ["Trainer", "train", "evaluate_method", "build_method", "default_run_dir"]
