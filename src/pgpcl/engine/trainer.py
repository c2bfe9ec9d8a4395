"""The task loop: train each task, build PGP bases, evaluate on every seen task, write results.

Order of a training step (as released): forward, loss, backward, clip grad norm, project, optimizer step.

Per task: ``method.begin_task``; PGP basis (if the method builds it at task start); projector snapshot;
training (checkpoint every ``train.checkpoint_every`` steps and after the last step); projector leak;
PGP basis (if built at task end); ``method.end_task``; evaluation on every seen task; results and the
task's checkpoint.

Resume (``pgpcl train --resume RUN_DIR``): the newest checkpoint (see :mod:`pgpcl.engine.checkpoint`)
restores the trainable state, optimizer, scheduler, RNG states, projection memory and task-start
snapshot, results so far and the position; the data order of an epoch is a function of (seed, task,
epoch) and augmentation is seeded per sample, so skipping the batches already done reproduces the
uninterrupted run exactly on CPU. SIGINT / SIGTERM write a checkpoint at the next step boundary (or
point to the last one) and raise :class:`Interrupted`; the CLI exits 130 / 143 with one line.

Multi-process: see :mod:`pgpcl.engine.distributed` (``train.batch_size`` is the global batch).
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgpcl.config import RESULT_NEUTRAL_KEYS, Config, checked_config, config_difference, dump_yaml
from pgpcl.engine import checkpoint as ckpt
from pgpcl.engine.distributed import (
    DistContext,
    EpochPlan,
    already_agreed,
    derive_seed,
    init_distributed,
    sharded_loader,
)
from pgpcl.engine.results import RESULTS_FILENAME, Results, now_iso, read_results, write_results
from pgpcl.engine.rundir import (
    check_run_dir,
    discard_new_run_dir,
    lock_run_dir,
    prepare_run_dir,
    run_status,
    unlock_run_dir,
)
from pgpcl.engine.seed import bf16_cpu_warning, seed_everything
from pgpcl.errors import ConfigError, DataError, OutOfMemory, PgpclError, allocation_failure, one_line
from pgpcl.io import atomic_write_text
from pgpcl.progress import duration
from pgpcl.progress import progress as phase_progress

TEST_HOOK_ENV = "PGPCL_TEST_HOOK"
"""``POINT=SIG[,POINT=SIG...]``: the process sends itself SIG (KILL, INT or TERM) at POINT. For tests of
resume and interrupts only. Points: ``step:T:K`` (after step K of task T, and its checkpoint, if any),
``basis:T`` (during the representation pass of task T; ``head_basis:T``: the task-end pass that builds
only the head's groups, ``pgp.protect_head`` with L2P), ``task_end:T`` (after task T's checkpoint and
results). Tasks count from 0, steps from 1."""

RESUME_MUTABLE = RESULT_NEUTRAL_KEYS
"""Config keys that may differ on ``--resume`` (where and how fast, never what is computed)."""


_notes_printed: set[str] | None = None  # inside each_note_once(): the set-up notes printed so far


@contextlib.contextmanager
def each_note_once():
    """Within the block a set-up note or warning that a run prints is printed once, however many runs
    train there with it (``pgpcl demo``: 36 runs of one override would repeat it 36 times)."""
    global _notes_printed
    outer, _notes_printed = _notes_printed, set() if _notes_printed is None else _notes_printed
    try:
        yield
    finally:
        _notes_printed = outer


def _print_note(text: str) -> None:
    if _notes_printed is not None:
        if text in _notes_printed:
            return
        _notes_printed.add(text)
    print(text, file=sys.stderr)


@dataclass
class TaskEval:
    """Accuracy (%) on each seen task after training one task."""

    cil: list[float] = field(default_factory=list)
    til: list[float] = field(default_factory=list)


class Interrupted(Exception):
    """Training stopped on SIGINT / SIGTERM; ``str(e)`` says where the progress is and how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _EvalStopped(Exception):
    pass


def micro_batch_rows(n: int, pieces: int, keep_empty: bool = False) -> list[slice]:
    """The ``pieces`` near-equal, contiguous row ranges of a batch of ``n`` rows (fewer when ``n < pieces``,
    unless ``keep_empty``: under DDP every rank must take as many backward passes, so some are empty)."""
    count = pieces if keep_empty else max(1, min(pieces, n))
    size, extra = divmod(n, count)
    bounds = [j * size + min(j, extra) for j in range(count + 1)]  # the first `extra` pieces get one more
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def build_method(cfg: Config, scenario):
    from pgpcl.methods import METHODS

    return METHODS.get(cfg.method.name).build(cfg, scenario)


def make_optimizer(params, cfg: Config, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(t.betas), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=weight_decay)


def effective_lr(cfg: Config, lr: float, task_images: int) -> float:
    """``lr``, times the batch a step really takes over 256 with ``train.lr_scale_by_batch``: a task of
    fewer images than ``train.batch_size`` trains on batches of all its images, and scaling by the
    configured size would multiply the rate by the ratio (batch 100000 on a task of 80: 1250x)."""
    if not cfg.train.lr_scale_by_batch:
        return lr
    return lr * min(cfg.train.batch_size, task_images) / 256


# ----------------------------------------------------------------------------------------------------
# Signals and test hooks


class _StopOnSignal:
    """First SIGINT / SIGTERM sets ``signum`` (the loop checkpoints and stops); a second one aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._old:
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop waiting for a step boundary
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}


class _TestHooks:
    def __init__(self, spec: str):
        self.points: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            point, _, sig = item.rpartition("=")
            self.points[point] = int(getattr(signal, f"SIG{sig.strip().upper()}"))

    def fire(self, point: str) -> None:
        sig = self.points.get(point)
        if sig is not None:
            os.kill(os.getpid(), sig)
            if sig in (signal.SIGINT, signal.SIGTERM):
                time.sleep(0.05)  # let the handler run before the next step boundary


# ----------------------------------------------------------------------------------------------------
# Config checks for --resume


def resume_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The config of the run in ``run_dir`` (its config.yaml), with overrides of the keys a resume may
    change (:data:`RESUME_MUTABLE`); any other override must equal the run's value."""
    from pgpcl.config import apply_overrides, config_from_dict, with_legacy_values
    from pgpcl.engine.evaluate import load_run_config, load_run_config_raw

    raw = with_legacy_values(load_run_config_raw(run_dir))
    stored = load_run_config(run_dir, raw)
    if not overrides:
        return stored
    cfg = config_from_dict(apply_overrides(raw, list(overrides)))
    diff = config_difference(stored.to_dict(), cfg.to_dict())
    if diff is not None:
        key, was, now = diff
        raise ConfigError(
            f"--resume cannot change {key} (the run has {was!r}, the override gives {now!r}); only "
            f"{', '.join(sorted(RESUME_MUTABLE))} may change on resume: start a new run to change it"
        )
    return cfg


def _check_resume_config(cfg: Config, run_dir: Path) -> None:
    """A resumed run trains what its config.yaml says: a config given from Python that differs in a key
    that changes the numbers is refused before anything is loaded."""
    from pgpcl.engine.evaluate import run_config_difference

    if not (run_dir / "config.yaml").is_file():
        return  # nothing to match: the checks on the folder and its checkpoint say what is wrong
    diff = run_config_difference(run_dir, cfg)
    if diff is not None:
        key, was, now = diff
        raise ConfigError(
            f"the config given to resume {run_dir} differs from its config.yaml in {key} (the run has {was!r}, "
            f"the config gives {now!r}); resume with resume_config('{run_dir}'), or start a new run to change it"
        )


# ----------------------------------------------------------------------------------------------------


class Trainer:
    """Runs one config through its whole task sequence into ``run_dir``.

    ``resume=True`` continues the run in ``run_dir`` from its newest checkpoint (from the beginning if it
    has none). ``dist``: the torch.distributed context (default: joined from torchrun's environment, or
    one process).
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        overwrite: bool = False,
        resume: bool = False,
        dist: DistContext | None = None,
        task_lines: bool = True,
    ):
        from pgpcl.data import build_scenario

        cfg = checked_config(cfg)  # one built or changed in Python is checked as a YAML file is
        if resume:
            _check_resume_config(cfg, Path(run_dir))
        self.cfg = cfg
        self.task_lines = task_lines  # the line per finished task (with train.progress)
        self.run_dir = Path(run_dir)
        self.dist = dist if dist is not None else init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.hooks = _TestHooks(os.environ.get(TEST_HOOK_ENV, ""))
        self._signals = _StopOnSignal()
        self._from_scratch_note = False
        self._pending: dict | None = None
        self._start_task = 0
        self._last_ckpt: tuple[Path, str] | None = None
        self._resuming, self._run_written = resume, False  # written: the folder holds config and results
        self._phase: tuple[str, str] = ("set-up", "train.eval_batch_size")  # what runs now; its size key
        self._ddp = None
        self.tb = None
        self._eval_queries: dict[tuple[int, int], Tensor] = {}  # evaluate_method's query_cache, per run
        error = None
        try:
            if not resume and self.is_main:
                check_run_dir(self.run_dir, overwrite=overwrite)  # fail before any work, write nothing
            if cfg.train.num_threads is not None:
                torch.set_num_threads(cfg.train.num_threads)
            seed_everything(cfg.seed, cfg.train.deterministic)
            warnings = [bf16_cpu_warning(cfg.train.amp, self.device)]
            if cfg.data.setting == "online" and cfg.train.epochs != 1:
                warnings.append(f"pgpcl: note: data.setting=online sees each training image once: train.epochs="
                                f"{cfg.train.epochs} is not used (one pass per task)")
            for warning in filter(None, warnings):
                if self.is_main:
                    _print_note(warning)
            if cfg.train.tensorboard and self.is_main:
                _summary_writer()  # before anything is written: a missing package must not leave a folder
            self.scenario = build_scenario(cfg.data, cfg.seed)
            for note in self.scenario.notes if self.is_main else ():
                _print_note(f"pgpcl: note: {note}")
            self.method = build_method(cfg, self.scenario).to(self.device)
            self.pgp = self._build_pgp()
            self.results = self._new_results()
            if resume:
                self._resume()
        except PgpclError as e:
            if already_agreed(e):
                raise
            error = e
        except Exception as e:  # a model too large for the device: one line, on every rank
            asked = allocation_failure(e)
            if asked is None:
                raise
            error = OutOfMemory(f"out of memory building the model ({asked} on {self.device}); "
                                "lower the method's sizes (e.g. method.pool_size, method.length) or the "
                                "backbone's, or use a device with more memory")
        self.dist.agree(error)
        self.dist.agree(self._differs_from_rank_0())
        error = None
        if self.is_main:
            try:
                with self._writing(self.run_dir):
                    if not resume:
                        prepare_run_dir(self.run_dir, overwrite=overwrite)
                        atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    lock_run_dir(self.run_dir)  # a resumed run too: one process per run folder
                    if self._from_scratch_note:
                        _print_note(f"pgpcl: note: {self.run_dir} holds no checkpoint yet: training from the start")
                    self._write()
                    self._run_written = True
                    self.tb = self._tensorboard()
            except PgpclError as e:
                unlock_run_dir(self.run_dir)  # run() never starts, so it cannot release it
                if not (resume or self._run_written):
                    discard_new_run_dir(self.run_dir)  # no empty a/b/run/ left behind
                error = e
        self.dist.agree(error)

    # -- set-up ------------------------------------------------------------------------------------
    def _differs_from_rank_0(self) -> PgpclError | None:
        """Under torchrun, every process must train the same run: a rank started with another seed or
        learning rate (or other data) would train silently on its own, and rank 0 records only its own."""
        if self.dist.world_size == 1:
            return None
        mine = (self.cfg.to_dict(), ckpt.scenario_record(self.scenario))
        config0, scenario0 = self.dist.broadcast_object(mine)
        diff = config_difference(config0, mine[0])
        if diff is not None:
            key, was, now = diff
            return PgpclError(f"this process has {key}={now!r} but rank 0 has {was!r}; start every process "
                              "with the same command")
        if scenario0 != mine[1]:
            return PgpclError("this process read other data than rank 0 (class order, task split or image "
                              "counts differ); give every process the same dataset")
        return None

    def _build_pgp(self):
        if not self.cfg.pgp.enabled:
            return None
        from pgpcl.engine.pgp_hooks import PGPHooks

        return PGPHooks(self.method, self.cfg.pgp, self.device)

    def _device_label(self) -> str:
        if self.dist.world_size > 1:
            return f"{self.device.type} x{self.dist.world_size}"
        return str(self.device)

    def _weights_sha(self) -> str | None:
        return ckpt.weights_sha(self.method)

    def _new_results(self):
        from pgpcl.engine.results import new_results

        info = getattr(self.method, "weights_info", None)
        sc = self.scenario
        r = new_results(
            self.cfg,
            num_tasks=sc.num_tasks,
            class_order=sc.class_order,
            task_classes=sc.task_classes,
            class_names=sc.class_names,
            domain_names=sc.domain_names if sc.setting == "dil" else None,
            weights={"source": getattr(info, "source", None), "sha256": getattr(info, "sha256", None)},
            device=self._device_label(),
            eval_til=sc.has_til,
        )
        self._note_world(r)
        return r

    def _note_world(self, r: Results) -> None:
        r.extra.pop("distributed", None)
        if self.dist.world_size > 1:
            r.extra["distributed"] = {
                "world_size": self.dist.world_size,
                "backend": self.dist.backend,
                "global_batch_size": self.cfg.train.batch_size,
            }

    def _tensorboard(self):
        return _summary_writer()(str(self.run_dir / "tensorboard")) if self.cfg.train.tensorboard else None

    def _scenario_record(self) -> dict:
        return ckpt.scenario_record(self.scenario)

    # -- resume ------------------------------------------------------------------------------------
    def _resume(self) -> None:
        found, error = None, None
        if self.is_main:
            try:
                found = ckpt.find_resume_checkpoint(self.run_dir)
            except PgpclError as e:
                error = e
        self.dist.agree(error)
        found = self.dist.broadcast_object(found)
        if found is None:  # nothing saved yet: start from the beginning in the same folder
            self._from_scratch_note = self.is_main  # said once the folder is locked: it may be another's
            return
        path, state = found
        ckpt.check_matches_run(path, state, config=self.cfg.to_dict(), scenario=self._scenario_record(),
                               weights_sha256=self._weights_sha(), pgp_enabled=self.pgp is not None,
                               run_dir=self.run_dir)
        self.results = Results.from_dict(ckpt.from_json(state["results"], "results", path))
        self.results.mark("running")
        self.results.device = self._device_label()
        self._note_world(self.results)
        # the processes that continue it: `distributed` records only the last ones, which may differ
        self.results.extra.setdefault("resumes", []).append(
            {"from": ckpt.describe(state, self.scenario.num_tasks), "at": now_iso(), "world_size": self.dist.world_size}
        )
        if self.pgp is not None:
            self.pgp.load_state_dict(state["pgp"])
            self.pgp.basis_log = list(ckpt.from_json(state["basis_log"], "basis log", path))
        pos = state["position"]
        task = int(pos["task"])
        if pos["stage"] == "train":
            self.method.begin_task(task)  # re-enter the task, then overwrite whatever it initialised
        ckpt.load_method_state(self.method, state, path)
        if pos["stage"] == "train":
            if self.pgp is not None:
                self.pgp.load_task_start_state(task, state["pgp_task_start"])
            self._pending = {
                "task": task,
                "step": int(pos["step"]),
                "optimizer": state["optimizer"],
                "scheduler": state["scheduler"],
                "timing": dict(state["timing"]),
            }
        self._start_task = task
        self._last_ckpt = (path, ckpt.describe(state, self.scenario.num_tasks))
        ckpt.restore_rng(state["rng"])  # last: building the model above drew from the generators

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> Results:
        self._signals.install()
        try:
            setup_s = self._warm_up()
            for task in range(self._start_task, self.scenario.num_tasks):
                self.run_task(task, setup_s if task == self._start_task else 0.0)
            self.results.mark("complete")
            self._write()
            if self.is_main:
                ckpt.last_path(self.run_dir).unlink(missing_ok=True)
                if self._stop_requested():  # the signal came after the last point that stops: say it was seen
                    _print_note(f"pgpcl: note: {signal.Signals(self._signum()).name} came as the run finished; "
                                f"it is complete and saved in {self.run_dir}")
        except DataError as e:
            # e.g. a corrupt image met mid-run: the progress so far is kept and can be continued
            err = e
            if self._last_ckpt is not None:
                err = DataError(f"{one_line(e)}; progress so far is in {self._last_ckpt[0]}: once fixed, "
                                f"continue with {self._resume_command()}")
            self._fail(err)
            if err is e:
                raise
            raise err from None
        except Interrupted:  # Ctrl+C / SIGTERM: progress is saved and the run stays resumable
            raise
        except Exception as e:  # user errors, a peer's failure, and bugs (which keep their traceback)
            err = self._out_of_memory(e)
            self._fail(err or e)
            if err is None:
                raise
            raise err from None
        finally:
            self._signals.restore()
            if self.is_main:
                unlock_run_dir(self.run_dir)
            if self.tb is not None:
                self.tb.close()
        return self.results

    def _fail(self, e: BaseException) -> None:
        self.results.mark("failed", one_line(e)[:1000])
        with contextlib.suppress(Exception):
            self._write()

    def _warm_up(self) -> float:
        """One-off set-up before the first task of this process; returns its seconds.

        Converts every in-memory split once and runs one no-grad evaluation forward on a few test
        images, so that the process's cold start (kernel and thread-pool initialisation, the first
        conversion) is recorded as ``setup_s`` rather than inflating whichever phase happens to come
        first (the PGP basis pass for L2P, the first training steps otherwise). Changes no state.
        """
        if self._start_task >= self.scenario.num_tasks:
            return 0.0
        start, error = time.perf_counter(), None
        p = self.cfg.pgp
        try:
            self.scenario.prepare(unaugmented_train=p.enabled and not p.sample_augment)
            ds = self.scenario.test_dataset(self._start_task)
            n = min(self.cfg.train.batch_size, len(ds))
            if n > 0:
                x, _, _ = ds.__getitems__(list(range(n)))
                was_training = self.method.training
                self.method.eval()
                with torch.no_grad(), self._autocast():
                    self.method.predict(x.to(self.device))
                self.method.train(was_training)
        except PgpclError as e:  # e.g. an unreadable test image: every rank stops, one prints it
            error = e
        self.dist.agree(error)
        return time.perf_counter() - start

    def _check_representations(self, task: int) -> None:
        ds = self.scenario.test_dataset(task)
        if len(ds) > 0:
            x, _, t = ds.__getitems__(list(range(min(4, len(ds)))))
            self.pgp.check_representations(x.to(self.device), t.to(self.device))

    def run_task(self, task: int, setup_s: float = 0.0) -> None:
        """Train, (build the basis,) evaluate and checkpoint ``task``; ``setup_s`` is the process's
        set-up time charged to it (the first task this process runs)."""
        method, timing = self.method, None
        pending = self._pending if self._pending is not None and self._pending["task"] == task else None
        self._pending = None
        if pending is None:
            timing = {"task": task, "basis_s": 0.0, "train_s": 0.0, "steps": 0, "images": 0}
            method.begin_task(task)
            part = None if self.pgp is None else self.pgp.part_built_at("task_start")
            if part is not None:
                self._set_phase(task, "the PGP basis pass", "pgp.sample_batch_size")
                timing["basis_s"] += self._build_basis(task, part)
            if self.pgp is not None:
                self.pgp.begin_task(task)
                if task == self._start_task:  # a method of one's own with a shape bug: said now, not after a task
                    self._check_representations(task)
        else:
            timing = pending["timing"]
        timing["setup_s"] = float(timing.get("setup_s", 0.0)) + setup_s
        self._set_phase(task, "training", "train.batch_size")
        self.train_task(task, timing, pending)
        if self.pgp is not None:
            for group, rec in self.pgp.end_task(task).items():
                self.results.add_projection(task, group, rec["rank"], rec["dim"], rec["leak"])
        part = None if self.pgp is None else self.pgp.part_built_at("task_end")
        if part is not None:
            self._set_phase(task, "the PGP basis pass", "pgp.sample_batch_size")
            timing["basis_s"] += self._build_basis(task, part)
        method.end_task(task)
        self._set_phase(task, "evaluation", "train.eval_batch_size")
        start = time.perf_counter()
        ev = self.evaluate(task)
        timing["eval_s"] = time.perf_counter() - start
        self._record(task, ev, timing)
        self._announce(task, timing)
        self._save_task_checkpoint(task)
        self._write()
        self.hooks.fire(f"task_end:{task}")

    def _set_phase(self, task: int, phase: str, size_key: str) -> None:
        self._phase = (f"task {task + 1}/{self.scenario.num_tasks}'s {phase}", size_key)

    def _build_basis(self, task: int, part: str = "all") -> float:
        from pgpcl.engine.pgp_hooks import BasisInterrupted

        start = time.perf_counter()
        p = self.cfg.pgp
        seed = self.cfg.seed + 1000 * task
        samples = self.scenario.sample_dataset(task, p.num_samples, seed=seed, augment=p.sample_augment)
        loader = sharded_loader(samples, p.sample_batch_size, self.cfg.data, self.dist, seed=seed)
        # A released-size pass (768 ViT-B/16 images) takes minutes on a CPU: show it like training.
        bar = phase_progress(len(loader), f"task {task + 1}/{self.scenario.num_tasks} PGP basis",
                             self.cfg.train.progress and self.is_main)

        def on_batch() -> None:
            bar.update()
            self.hooks.fire(f"{'head_basis' if part == 'head' else 'basis'}:{task}")

        try:
            self.pgp.build_basis(
                task, loader, should_stop=self._stop_requested, agree=self.dist.agree, on_batch=on_batch, part=part,
            )
        except BasisInterrupted:
            self._interrupted(f"while building the PGP basis of task {task + 1}/{self.scenario.num_tasks}")
        finally:
            bar.close()
        return time.perf_counter() - start

    # -- training ----------------------------------------------------------------------------------
    def _epoch_seed(self, task: int, epoch: int) -> int:
        return derive_seed(self.cfg.seed, 7919, task, epoch)

    def train_task(self, task: int, timing: dict, pending: dict | None = None) -> None:
        """Train ``task`` from step 0, or from ``pending`` (a resumed position); adds to ``timing``."""
        cfg, method, d = self.cfg, self.method, self.dist
        lr, wd = method.task_optimizer_settings(task, cfg.train.lr, cfg.train.weight_decay)
        params = method.trainable_parameters()
        dataset = self.scenario.train_dataset(task, generator_seed=0)
        optimizer = make_optimizer(params, cfg, effective_lr(cfg, lr, len(dataset)), wd)
        B = cfg.train.batch_size
        per_epoch = math.ceil(len(dataset) / B)
        epochs = 1 if self.scenario.online else cfg.train.epochs
        total = epochs * per_epoch
        if cfg.train.max_steps_per_task is not None:
            total = min(total, cfg.train.max_steps_per_task)
        scheduler = None
        by_epoch = cfg.train.scheduler_every == "epoch"
        if cfg.train.scheduler == "cosine":
            periods = math.ceil(total / per_epoch) if by_epoch else total
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(periods, 1))
        steps, images = int(timing.get("steps", 0)), int(timing.get("images", 0))
        if pending is not None:
            optimizer.load_state_dict(pending["optimizer"])
            if scheduler is not None and pending.get("scheduler") is not None:
                scheduler.load_state_dict(pending["scheduler"])
            steps = int(pending["step"])
        class_mask = self.scenario.class_mask(task).to(self.device)
        model = self._wrap_ddp()
        method.train()
        augments = bool(getattr(dataset.transform, "augments", False))
        every = cfg.train.checkpoint_every
        T = self.scenario.num_tasks
        bar = phase_progress(total, f"task {task + 1}/{T} train", cfg.train.progress and self.is_main, initial=steps)
        start, base_s = time.perf_counter(), float(timing.get("train_s", 0.0))
        ckpt_s = float(timing.get("checkpoint_s", 0.0))  # checkpoint writes, inside train_s

        def timing_now() -> dict:
            return {**timing, "train_s": base_s + time.perf_counter() - start, "steps": steps, "images": images,
                    "checkpoint_s": ckpt_s}

        def save_checkpoint() -> None:
            nonlocal ckpt_s
            t0 = time.perf_counter()
            self._save_mid_checkpoint(task, steps, optimizer, scheduler, timing_now())
            ckpt_s += time.perf_counter() - t0

        try:
            while steps < total:
                epoch, first = divmod(steps, per_epoch)
                plan = EpochPlan(len(dataset), B, self._epoch_seed(task, epoch), d.rank, d.world_size, augments)
                loader, real = plan.loader(dataset, cfg.data, first)
                it = iter(loader)
                for k in range(len(real)):
                    if steps >= total:
                        break
                    batch, error = None, None
                    try:
                        batch = next(it)
                    except PgpclError as e:
                        error = e
                    if d.agree(error, self._stop_requested()):
                        path = self._save_mid_checkpoint(task, steps, optimizer, scheduler, timing_now())
                        raise Interrupted(
                            self._signum(),
                            f"interrupted at task {task + 1}/{T}, step {steps}/{total}; saved {path}; "
                            f"continue with: {self._resume_command()}",
                        )
                    n_global = plan.global_size(first + k)
                    loss, correct = self.train_step(*batch, class_mask, optimizer, params, model=model,
                                                    real=real[k], task=task, step=steps + 1, n_global=n_global)
                    steps, images = steps + 1, images + n_global
                    if scheduler is not None and (not by_epoch or steps % per_epoch == 0):
                        scheduler.step()
                    self._log_step(bar, task, steps, loss, correct / n_global)
                    if (every and steps % every == 0) or steps == total:
                        save_checkpoint()
                    self.hooks.fire(f"step:{task}:{steps}")
                del it, loader
        finally:
            bar.close()
            self._release_ddp()
        timing.update(timing_now())

    def train_step(
        self, x: Tensor, y: Tensor, t: Tensor, class_mask: Tensor, optimizer, params, *,
        model=None, real: bool = True, task: int | None = None, step: int | None = None,
        n_global: int | None = None,
    ) -> tuple[float, int]:
        """One optimizer step on this rank's share of a global batch of ``n_global`` images (None: counted
        here), in ``train.micro_batches`` pieces. Returns (mean loss over the global batch, correct
        predictions in the global batch)."""
        d = self.dist
        model = model if model is not None else self.method
        x, y, t = (v.to(self.device, non_blocking=True) for v in (x, y, t))
        if n_global is None:
            n_local = float(len(y) if real else 0)
            n_global = int(d.all_reduce_sum(torch.tensor([n_local], dtype=torch.float64))[0])
        pieces = micro_batch_rows(len(y), self.cfg.train.micro_batches, keep_empty=d.enabled)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, correct = 0.0, 0
        whole = self.method.whole_batch(x, t) if len(pieces) > 1 else contextlib.nullcontext()
        with whole:  # what the method decides for the batch as a whole (a vote), decided once
            for j, rows in enumerate(pieces):
                # DDP all-reduces the summed gradients in the last piece's backward only
                sync = d.enabled and j < len(pieces) - 1 and hasattr(model, "no_sync")
                n_rows = rows.stop - rows.start if real else 0
                if rows.stop == rows.start:  # an empty piece of a small share: a stand-in row weighted 0 (DDP)
                    rows = slice(0, 1)
                with model.no_sync() if sync else contextlib.nullcontext():
                    piece_loss, piece_correct = self._backward_piece(
                        model, x[rows], y[rows], t[rows], class_mask, n_rows, n_global, task, step)
                loss_sum, correct = loss_sum + piece_loss, correct + piece_correct
        if self.cfg.train.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.clip_grad)
        if self.pgp is not None:
            self.pgp.before_step()  # target=gradient: projects the gradients here
        optimizer.step()
        if self.pgp is not None:
            self.pgp.after_step()
        return loss_sum / max(n_global, 1), correct

    def _backward_piece(
        self, model, x: Tensor, y: Tensor, t: Tensor, class_mask: Tensor, n_rows: int, n_global: int,
        task: int | None, step: int | None,
    ) -> tuple[float, int]:
        """Forward and backward of one piece of a step's batch, whose ``n_rows`` real rows (0: a stand-in)
        carry their share of the mean loss over the ``n_global`` images of the global batch. Returns the
        summed loss and the correct predictions of this piece on every rank together."""
        d = self.dist
        with self._autocast():
            out = model(x, t)
            loss = self.method.loss(out, y, class_mask)
        masked = out.logits.detach().masked_fill(~class_mask, float("-inf"))
        correct = (masked.argmax(1) == y).sum()
        if d.enabled:
            finite = bool(torch.isfinite(loss.detach()))
            stats = torch.tensor(
                [float(loss.detach()) * n_rows if finite else 0.0, float(correct) if n_rows else 0.0,
                 0.0 if finite else 1.0], dtype=torch.float64,
            )
            stats = d.all_reduce_sum(stats)  # every rank sees a failure and stops at the same step
            loss_sum = float(stats[0]) if stats[2] == 0 else float("nan")
            correct_value = int(stats[1])
            # DDP averages gradients over ranks: weight each rank's mean loss by its share of the batch.
            weight = n_rows * d.world_size / max(n_global, 1)
        else:
            loss_sum, correct_value = loss.item() * n_rows, int(correct)
            weight = n_rows / max(n_global, 1)
        if not math.isfinite(loss_sum):
            raise self._nonfinite_error(task, step, f"the training loss became {loss_sum / max(n_global, 1)}")
        (loss if weight == 1.0 else loss * weight).backward()
        return loss_sum, correct_value

    def _wrap_ddp(self):
        """The method under DistributedDataParallel (multi-process), else the method itself.

        A fresh wrapper per task (methods may train other parameters in other tasks). Only trainable
        parameters are registered with DDP: the frozen backbone and buffers are ignored, so nothing frozen
        is broadcast or all-reduced. ``find_unused_parameters`` follows the method's
        ``ddp_find_unused_parameters`` (True when absent: always correct, one graph traversal per step;
        a method whose every trainable parameter takes part in every step sets it False).
        """
        if not self.dist.enabled:
            return self.method
        from torch.nn.parallel import DistributedDataParallel as DDP

        self._release_ddp()
        m = self.method
        ignore = [n for n, p in m.named_parameters() if not p.requires_grad] + [n for n, _ in m.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(m, ignore)
        kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        # static_graph=True is not used: with ignored frozen parameters it gave different gradients
        # from one process (torch 2.14), find_unused_parameters does not.
        find_unused = bool(getattr(m, "ddp_find_unused_parameters", True))
        self._ddp = DDP(m, find_unused_parameters=find_unused, **kwargs)
        return self._ddp

    def _release_ddp(self) -> None:
        if self._ddp is not None:
            with contextlib.suppress(Exception):
                self._ddp._remove_autograd_hooks()  # the next task's wrapper registers its own
            self._ddp = None

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

    # -- interrupts and failures -------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        return self._signals.signum is not None

    def _signum(self) -> int:
        return self._signals.signum or int(signal.SIGINT)

    def _resume_command(self) -> str:
        if self.dist.world_size > 1:
            return f"torchrun --nproc_per_node=N -m pgpcl train --resume {shlex.quote(str(self.run_dir))}"
        return f"pgpcl train --resume {shlex.quote(str(self.run_dir))}"

    def _last_checkpoint_text(self) -> str:
        if self._last_ckpt is None:
            return "no checkpoint was written yet"
        path, desc = self._last_ckpt
        return f"the last checkpoint is {path} ({desc})"

    def _interrupted(self, during: str):
        raise Interrupted(
            self._signum(),
            f"interrupted {during}; {self._last_checkpoint_text()}; continue with: {self._resume_command()}",
        )

    def _out_of_memory(self, e: BaseException) -> OutOfMemory | None:
        """``e`` as a one-line error that says what to change, when it is an allocation failure."""
        asked = allocation_failure(e)
        if asked is None:
            return None
        phase, size_key = self._phase
        t = self.cfg.train
        pieces = ","
        if size_key == "train.batch_size" and t.micro_batches < t.batch_size:
            m = min(2 * t.micro_batches, t.batch_size)
            pieces = f", add train.micro_batches={m} to that to train each batch in {m} pieces,"
        return OutOfMemory(
            f"out of memory in {phase} ({asked} on {self.device}); {self._last_checkpoint_text()}; free memory "
            f"and continue with {self._resume_command()}{pieces} or lower {size_key} and start again with "
            "--overwrite"
        )

    def _nonfinite_error(self, task: int | None, step: int | None, what: str) -> PgpclError:
        where = "" if task is None else f" at task {task + 1}/{self.scenario.num_tasks}" + (
            f", step {step}" if step is not None else "")
        return PgpclError(
            f"{what}{where}; training stopped and {self._last_checkpoint_text()}; lower train.lr "
            "(or check the data), then start again with --overwrite"
        )

    def _check_finite(self, task: int, step: int | None) -> None:
        for name, p in self.method.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
                raise self._nonfinite_error(task, step, f"parameter '{name}' became NaN/inf")

    # -- checkpoints -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self, path: Path):
        """Turn a failed write (unwritable folder, disk full) into a one-line user error. Once the run's
        folder holds its config, the fix is to make room and resume, not to start again elsewhere."""
        try:
            yield
        except OSError as e:
            if not (self._run_written or self._resuming):
                fix = "choose a writable folder (--run-dir / output_dir=...) or free disk space"
            else:
                fix = f"free disk space or make {self.run_dir} writable, then continue with {self._resume_command()}"
                if self._last_ckpt is not None:
                    fix += f" ({self._last_checkpoint_text()})"
            raise PgpclError(f"cannot write {path} ({e.strerror or e}); {fix}") from None

    def _state(self, position: dict, *, task: int, optimizer=None, scheduler=None, timing=None) -> dict:
        r = self.results
        if self.pgp is not None:
            r.extra["basis"] = self.pgp.basis_log
        return {
            "task": task,
            "position": position,
            "method": self.method.trainable_state_dict(),
            "method_extra": ckpt.method_extra_state(self.method),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "pgp": self.pgp.state_dict() if self.pgp is not None else None,
            "pgp_task_start": self.pgp.task_start_state()
            if self.pgp is not None and position["stage"] == "train" else None,
            "basis_log": ckpt.to_json(self.pgp.basis_log if self.pgp is not None else []),
            "rng": ckpt.capture_rng(),
            "results": ckpt.to_json(r.to_dict()),
            "timing": timing,
            "config": ckpt.to_json(self.cfg.to_dict()),
            "scenario": self._scenario_record(),
            "weights_sha256": self._weights_sha(),
            "world_size": self.dist.world_size,
        }

    def _save_mid_checkpoint(self, task: int, steps: int, optimizer, scheduler, timing: dict) -> Path:
        self._check_finite(task, steps)
        path = ckpt.last_path(self.run_dir)
        if self.is_main:
            state = self._state({"task": task, "stage": "train", "step": steps}, task=task,
                                optimizer=optimizer, scheduler=scheduler, timing=timing)
            with self._writing(path):
                ckpt.save_checkpoint(path, state)
        self._last_ckpt = (path, f"task {task + 1}/{self.scenario.num_tasks}, step {steps}")
        return path

    def _save_task_checkpoint(self, task: int) -> Path:
        self._check_finite(task, None)
        path = ckpt.checkpoint_path(self.run_dir, task)
        if self.is_main:
            with self._writing(path):
                ckpt.save_checkpoint(path, self._state({"task": task + 1, "stage": "start", "step": 0}, task=task))
                ckpt.last_path(self.run_dir).unlink(missing_ok=True)
        self._last_ckpt = (path, f"after task {task + 1}/{self.scenario.num_tasks}")
        return path

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, after_task: int) -> TaskEval:
        """CIL: argmax over all classes seen so far, no task id; TIL: argmax within the true task's classes."""
        self.method.eval()
        try:
            return evaluate_method(self.method, self.scenario, after_task, self.cfg, self.device,
                                   dist=self.dist, should_stop=self._stop_requested,
                                   query_cache=self._eval_queries,
                                   progress=self.cfg.train.progress and self.is_main,
                                   desc=f"task {after_task + 1}/{self.scenario.num_tasks} eval")
        except _EvalStopped:
            self._interrupted(f"while evaluating after task {after_task + 1}/{self.scenario.num_tasks}")

    def _record(self, task: int, ev: TaskEval, timing: dict) -> None:
        r = self.results
        for setting, row in (("cil", ev.cil), ("til", ev.til)):
            if r.acc.get(setting) is None:
                continue
            for i, value in enumerate(row):
                r.set_acc(setting, i, task, value)
        r.refresh_metrics()
        r.add_timing(task, timing["train_s"], timing["eval_s"], timing["basis_s"], timing["steps"], timing["images"],
                     setup_s=timing.get("setup_s", 0.0), checkpoint_s=timing.get("checkpoint_s", 0.0))
        if self.pgp is not None:
            r.extra["basis"] = self.pgp.basis_log
        if self.tb is not None:
            for setting, m in r.metrics.items():
                if m is not None:
                    self.tb.add_scalar(f"eval/{setting}_avg_acc", m["final_acc"], task)
            for rec in r.projection:  # the task's leak per protected group (projected tasks only)
                if rec["task"] == task and rec["leak"] is not None:
                    self.tb.add_scalar(f"pgp/leak_{rec['group']}", rec["leak"], task)
            for rec in self.pgp.basis_log if self.pgp is not None else []:
                if rec["task"] == task:
                    self.tb.add_scalar(f"pgp/rank_{rec['group']}", rec["rank_after"], task)

    def _announce(self, task: int, timing: dict) -> None:
        """One line per finished task (main process, with train.progress), kept above the bars: the mean
        accuracy over the tasks seen so far and how long each phase took."""
        if not (self.task_lines and self.cfg.train.progress and self.is_main):
            return
        from tqdm.auto import tqdm

        accs = [f"{s.upper()} {m['final_acc']:.2f}" for s, m in self.results.metrics.items()
                if m is not None and m.get("final_acc") is not None]
        phases = [("train", timing["train_s"])]
        if self.pgp is not None:
            phases.append(("PGP basis", timing["basis_s"]))
        phases.append(("eval", timing["eval_s"]))
        took = ", ".join(f"{name} {duration(sec)}" for name, sec in phases)
        tqdm.write(f"task {task + 1}/{self.scenario.num_tasks}: {'  '.join(accs)} "
                   f"(mean over {task + 1} seen task{'s' if task else ''}; {took})")

    def _write(self) -> None:
        if self.is_main:
            with self._writing(self.run_dir / RESULTS_FILENAME):
                write_results(self.run_dir / RESULTS_FILENAME, self.results)


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PgpclError("train.tensorboard=true needs tensorboard: pip install tensorboard") from None
    return SummaryWriter


@torch.no_grad()
def evaluate_method(
    method, scenario, after_task: int, cfg: Config, device: torch.device, *,
    dist: DistContext | None = None, should_stop=None, query_cache: dict | None = None,
    progress: bool = False, desc: str = "eval",
) -> TaskEval:
    """Accuracy on the test sets of tasks 0..after_task. Under torch.distributed each rank evaluates a
    contiguous block of the test batches and the counts are summed over ranks.

    ``query_cache``: a dict kept for the run; each test batch's ``method.frozen_query`` is computed the
    first time the batch is evaluated and reused after later tasks (test transforms are deterministic
    and the batches are the same each time), which saves the query pass, ~45% of an evaluation batch.
    ``progress``: a progress bar over this rank's test batches of all seen tasks, labelled ``desc``.
    """
    seen = torch.zeros(scenario.num_classes, dtype=torch.bool, device=device)
    for i in range(after_task + 1):
        seen |= scenario.class_mask(i).to(device)
    counts = torch.zeros(after_task + 1, 3, dtype=torch.float64)  # CIL correct, TIL correct, images
    error, stopped = None, False
    bs, bar = cfg.train.eval_batch_size, None
    try:  # building a loader can meet bad data too: every rank must reach the agreement below
        loaders = [sharded_loader(scenario.test_dataset(i), bs, cfg.data, dist) for i in range(after_task + 1)]
        bar = phase_progress(sum(len(loader) for loader in loaders), desc, progress)
        for i, loader in enumerate(loaders):
            task_mask = scenario.class_mask(i).to(device)
            for b, (x, y, _) in enumerate(loader):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                x, y = x.to(device), y.to(device)
                logits = method.predict(x, query=_cached_query(query_cache, (i, b), method, x)).float()
                counts[i, 0] += int((logits.masked_fill(~seen, float("-inf")).argmax(1) == y).sum())
                counts[i, 1] += int((logits.masked_fill(~task_mask, float("-inf")).argmax(1) == y).sum())
                counts[i, 2] += len(y)
                bar.update()
            if stopped:
                break
    except PgpclError as e:
        error = e
    finally:
        if bar is not None:
            bar.close()
    if dist is not None:
        stopped = dist.agree(error, stopped)
        counts = dist.all_reduce_sum(counts)
    elif error is not None:
        raise error
    if stopped:
        raise _EvalStopped()
    ev = TaskEval()
    for i in range(after_task + 1):
        cil, til, count = (float(v) for v in counts[i])
        if count == 0:
            raise PgpclError(f"task {i} has no test images; check data.test_per_class and the dataset files")
        ev.cil.append(100.0 * cil / count)
        ev.til.append(100.0 * til / count)
    return ev


def _cached_query(cache: dict | None, key: tuple[int, int], method, x: Tensor) -> Tensor | None:
    """``method.frozen_query(x)``, from ``cache`` when this (task, batch) was evaluated before."""
    if cache is None:
        return None
    q = cache.get(key)
    if q is None or q.shape[0] != x.shape[0]:
        q = method.frozen_query(x)
        if q is not None:
            cache[key] = q
    return q


def default_run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / cfg.name / f"seed{cfg.seed}"


def train(
    cfg: Config, run_dir: str | Path | None = None, *, overwrite: bool = False, resume: bool = False,
    task_lines: bool = True,
):
    """Train ``cfg`` end to end; returns the :class:`Results` (also written to ``run_dir/results.json``).

    ``task_lines``: print a line per finished task when ``train.progress`` is on (the demo, which
    trains many short runs under its own progress bar, turns it off).

    Under torchrun this joins the process group (NCCL on GPUs, gloo on CPU) and leaves it at the end.
    ``resume=True`` continues the run in ``run_dir`` from its newest checkpoint; a finished run is
    returned as it is (nothing is trained or written), as ``pgpcl train --resume`` does.
    """
    cfg = checked_config(cfg)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    if resume and run_status(run_dir) == "complete":
        _check_resume_config(cfg, run_dir)
        return read_results(run_dir / RESULTS_FILENAME)
    dist = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, run_dir, overwrite=overwrite, resume=resume, dist=dist, task_lines=task_lines).run()
    finally:
        dist.close()


def continue_plan(cfg: Config, run_dir: Path) -> str:
    """What ``pgpcl train --continue`` does with ``run_dir``; reads only.

    'keep': it holds a finished run of ``cfg``; 'resume': an unfinished run of ``cfg`` (from its newest
    checkpoint, or from the start if it has none); 'start': no run there. A run of another config (one
    that differs in a key that changes the numbers) is refused, as is a run with no config.yaml.
    """
    from pgpcl.engine.evaluate import run_config_difference

    run_dir = Path(run_dir)
    status = check_run_dir(run_dir, overwrite=True)  # a file or a loop of links is refused here
    if status is None:
        return "start"
    what = "a finished run" if status == "complete" else f"an unfinished run (status: {status})"
    if not (run_dir / "config.yaml").is_file():
        raise PgpclError(f"{run_dir} holds {what} but no config.yaml, so --continue cannot tell what it trained; "
                         "pass --overwrite to replace it, or choose another folder with --run-dir or name=...")
    diff = run_config_difference(run_dir, cfg)
    if diff is not None:
        key, was, now = diff
        raise ConfigError(f"{run_dir} holds {what} of another config ({key}: the run has {was!r}, this command "
                          f"gives {now!r}); pass --overwrite to replace it, or choose another folder with "
                          "--run-dir or name=...")
    if status == "complete":
        read_results(run_dir / RESULTS_FILENAME)  # the run kept must be this one: a copied-in file is refused
        return "keep"
    return "resume"


def continue_training(cfg: Config, run_dir: str | Path | None = None, *, task_lines: bool = True):
    """Train ``cfg`` into ``run_dir`` from wherever that folder stands (see :func:`continue_plan`), so that
    one command both starts a job and, run again after a crash or a preemption, finishes it.

    Returns ``(results, plan)``, plan being 'keep', 'resume' or 'start'. Under torchrun rank 0 reads the
    folder and every rank follows its plan.
    """
    cfg = checked_config(cfg)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    dist = init_distributed(cfg.train.device)
    try:
        plan, error = None, None
        if dist.is_main:
            try:
                plan = continue_plan(cfg, run_dir)
            except PgpclError as e:
                error = e
        dist.agree(error)
        plan = dist.broadcast_object(plan)
        if plan == "keep":
            return read_results(run_dir / RESULTS_FILENAME), plan
        trainer = Trainer(cfg, run_dir, resume=plan == "resume", dist=dist, task_lines=task_lines)
        return trainer.run(), plan
    finally:
        dist.close()


__all__ = [
    "Interrupted",
    "RESUME_MUTABLE",
    "Trainer",
    "build_method",
    "config_difference",
    "continue_plan",
    "continue_training",
    "default_run_dir",
    "evaluate_method",
    "resume_config",
    "train",
]
