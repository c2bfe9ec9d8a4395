"""Continual scenarios: a dataset cut into tasks (CIL, TIL, online) or domains (DIL).

Labels are remapped so that ``class_order[i]`` (an original label) becomes class ``i``; task ``t`` of a
class-split scenario owns the contiguous remapped range ``task_classes[t]``. In DIL every task holds all
classes and task ``t`` is domain ``t``: either the dataset's own domain labels (``DatasetSplit.domains``)
or the ``t``-th dataset of ``data.domains``. With ``data.datasets`` (class-split settings) task ``t`` is the
``t``-th dataset, its classes numbered after those of the datasets before it.

Seeds: the class order uses ``data.order_seed`` (else the run seed); ``train_per_class`` /
``test_per_class`` subsampling uses the run seed; a train loader's shuffling and augmentation use its
``generator_seed``; a sample loader's subset and augmentation use its ``seed``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pgpcl.data.base import DatasetSplit, DatasetSplits, load_dataset, read_dataset
from pgpcl.data.taskset import TaskDataset, collate_batch, convert_split, seed_worker
from pgpcl.data.transforms import ImageTransform, build_transform
from pgpcl.errors import ConfigError, DataError

SETTINGS = ("cil", "til", "online", "dil")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so that distinct uses of one seed draw unrelated streams."""
    return int(
        np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )


@dataclass
class _Source:
    """One dataset read from disk and its original -> remapped label table."""

    data: DatasetSplits
    remap: np.ndarray  # int64 (num_classes,)
    train_keep: np.ndarray  # rows kept after train_per_class subsampling
    test_keep: np.ndarray


@dataclass
class _Task:
    source: int
    train: np.ndarray  # int64 row indices into the source's train split
    test: np.ndarray


# ----------------------------------------------------------------------------------------------------
# Building blocks


def split_classes(num_classes: int, num_tasks: int, first: int | None) -> list[int]:
    """Number of classes in each task: equal, or ``first`` then equal splits of the rest."""
    if num_tasks > num_classes:
        raise DataError(
            f"{num_classes} classes cannot be split into {num_tasks} tasks; set data.num_tasks <= {num_classes}"
        )
    if first is None:
        if num_classes % num_tasks:
            raise DataError(
                f"{num_classes} classes cannot be split into {num_tasks} equal tasks; "
                f"choose num_tasks dividing {num_classes} or set data.first_task_classes"
            )
        return [num_classes // num_tasks] * num_tasks
    rest, others = num_classes - first, num_tasks - 1
    if not 1 <= first <= num_classes:
        raise DataError(
            f"data.first_task_classes={first} is outside 1..{num_classes} (the dataset has {num_classes} "
            "classes); choose a value in that range"
        )
    if others == 0 and rest != 0:
        raise DataError(
            f"data.first_task_classes={first} with data.num_tasks=1 leaves {rest} of {num_classes} classes in no "
            f"task; with one task set data.first_task_classes={num_classes} or leave it out"
        )
    if others > 0 and rest < others:
        raise DataError(
            f"data.first_task_classes={first} leaves {rest} of {num_classes} classes for the other {others} "
            f"task{'s' if others > 1 else ''}, fewer than one each; set data.first_task_classes <= {num_classes - others}"
        )
    if others > 0 and rest % others:  # others >= 2 here: any count divides into one task
        raise DataError(
            f"data.first_task_classes={first} leaves {rest} of {num_classes} classes, which cannot be split into "
            f"{others} equal tasks; choose first_task_classes so the remaining classes divide evenly by {others}"
        )
    return [first] + [rest // others] * others if others else [first]


def make_class_order(num_classes: int, kind: str, seed: int) -> list[int]:
    if kind == "label":
        return list(range(num_classes))
    if kind == "random":
        return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]
    raise ConfigError(f"data.class_order must be 'label' or 'random', got {kind!r}")


def subsample(groups: np.ndarray, per_group: int | None, seed: int) -> np.ndarray:
    """Sorted row indices keeping at most ``per_group`` rows (seeded) of every group value."""
    if per_group is None:
        return np.arange(len(groups), dtype=np.int64)
    if per_group < 1:
        raise ConfigError(f"data.train_per_class / test_per_class must be >= 1, got {per_group}")
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(groups == g))[:per_group] for g in np.unique(groups)]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def _groups(split: DatasetSplit, per_domain: bool) -> np.ndarray:
    """Subsampling groups: class, or (domain, class) so that every domain keeps every class."""
    if per_domain and split.domains is not None:
        return split.domains * (int(split.targets.max()) + 1) + split.targets
    return split.targets


def _parse_entry(entry: str, root: str | None) -> tuple[str, str | None]:
    """'name' -> (name, data.root); 'name=/path' -> (name, /path)."""
    name, sep, path = entry.partition("=")
    return name.strip(), ((path.strip() or None) if sep else root)


def _domain_count(data: DatasetSplits) -> int:
    domains = [split.domains for split in (data.train, data.test) if split.domains is not None]
    return max((len(np.unique(d)) for d in domains), default=1)


def _read_entries(cfg: Any, key: str, what: str) -> list[DatasetSplits]:
    """The datasets that ``data.<key>`` lists, one per task; each entry once."""
    listed = getattr(cfg, key)
    entries = [_parse_entry(d, cfg.root) for d in listed]
    twice = next((d for i, d in enumerate(listed) if entries[i] in entries[:i]), None)
    if twice is not None:  # the same files twice: two identical tasks under one name
        raise ConfigError(f"data.{key} lists {twice!r} twice; give each {what} once")
    return [read_dataset(name, root, cfg.download) for name, root in entries]


def _load_sources(cfg: Any) -> list[DatasetSplits]:
    if cfg.datasets:
        return _load_dataset_list(cfg)
    if cfg.domains and cfg.setting != "dil":
        raise ConfigError("data.domains only applies to data.setting=dil; remove it or set data.setting=dil")
    if not cfg.domains:
        return [load_dataset(cfg)]
    if len(cfg.domains) != cfg.num_tasks:
        raise ConfigError(
            f"data.domains lists {len(cfg.domains)} datasets but data.num_tasks={cfg.num_tasks}; make them equal"
        )
    sources = _read_entries(cfg, "domains", "domain")
    for entry, src in zip(cfg.domains, sources):
        found = _domain_count(src)
        if found > 1:  # one task would mix them, and a[i][t] would no longer be one domain's accuracy
            raise DataError(
                f"data.domains entry {entry!r} holds {found} domains of its own; list one folder per domain, "
                "or give the dataset alone (without data.domains) for one task per domain"
            )
    counts = {entry: s.num_classes for entry, s in zip(cfg.domains, sources)}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"DIL domains must have the same number of classes, got {counts}; choose matching datasets"
        )
    return sources


def _load_dataset_list(cfg: Any) -> list[DatasetSplits]:
    """``data.datasets``: one dataset per task of a class-split setting."""
    if cfg.setting == "dil":
        raise ConfigError("data.datasets is for the class-split settings (one dataset per task, new classes each); "
                          "for domain-incremental learning list them under data.domains")
    if cfg.domains:
        raise ConfigError("data.datasets and data.domains cannot both be set; keep one")
    if len(cfg.datasets) != cfg.num_tasks:
        raise ConfigError(
            f"data.datasets lists {len(cfg.datasets)} datasets but data.num_tasks={cfg.num_tasks}; make them equal"
        )
    if cfg.first_task_classes is not None:
        raise ConfigError("data.first_task_classes does not apply with data.datasets (each task is one "
                          "dataset, with all its classes); unset it")
    return _read_entries(cfg, "datasets", "dataset")


# ----------------------------------------------------------------------------------------------------
# Scenario


class Scenario:
    """Tasks over one or more datasets, with loaders yielding ``(x, y, task)``.

    x float (B, C, S, S); y int64 (B,) remapped labels; task int64 (B,) the task id of each sample.
    """

    def __init__(
        self,
        cfg: Any,
        sources: list[_Source],
        tasks: list[_Task],
        class_order: list[int],
        task_classes: list[list[int]],
        domain_names: list[str] | None,
        class_names: list[str],
    ):
        self.cfg = cfg
        self.setting: str = cfg.setting
        self.online: bool = cfg.setting == "online"
        # TIL (logits restricted to a task's classes) needs tasks of disjoint classes; in dil every task
        # holds all classes, so runs record no TIL accuracy
        self.has_til: bool = cfg.setting != "dil"
        self.num_tasks: int = len(tasks)
        self.class_order = class_order
        self.num_classes: int = len(class_order)
        self.class_names: list[str] = class_names  # remapped order
        self.task_classes = task_classes
        self.domain_names = domain_names
        self.dataset_names = [s.data.name for s in sources]
        self.notes: list[str] = [note for s in sources for note in s.data.notes]
        single = [t + 1 for t, classes in enumerate(task_classes) if len(classes) == 1]
        if self.has_til and single:  # the task id names the class: TIL accuracy says nothing there
            which = "every task has" if len(single) == len(task_classes) else f"task(s) {', '.join(map(str, single))} have"
            self.notes.append(f"{which} one class, so TIL accuracy there is 100% by construction; read CIL")
        self.train_transform: ImageTransform = build_transform(
            cfg.train_transform, cfg.img_size, cfg.channels, cfg.normalize, True
        )
        self.test_transform: ImageTransform = build_transform(
            cfg.test_transform, cfg.img_size, cfg.channels, cfg.normalize, False
        )
        self._sources, self._tasks = sources, tasks
        self._digest: str | None = None

    # -- class bookkeeping -------------------------------------------------------------------------

    def class_mask(self, t: int) -> torch.Tensor:
        """BoolTensor (num_classes,): True for the classes of task ``t``."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[self.task_classes[self._check(t)]] = True
        return mask

    def seen_classes(self, t: int) -> list[int]:
        """Sorted remapped classes of tasks 0..t."""
        return sorted({c for k in range(self._check(t) + 1) for c in self.task_classes[k]})

    def train_indices(self, t: int) -> np.ndarray:
        """Rows of task ``t`` in its dataset's train split (after subsampling), for inspection."""
        return self._tasks[self._check(t)].train.copy()

    def _check(self, t: int) -> int:
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"task {t} out of range 0..{self.num_tasks - 1}")
        return t

    # -- loaders ------------------------------------------------------------------------------------

    def _dataset(
        self, t: int, role: str, rows: np.ndarray, transform: ImageTransform, seed: int
    ) -> TaskDataset:
        src = self._sources[self._tasks[t].source]
        split = src.data.train if role == "train" else src.data.test
        # Convert every kept row of the split at once, so that all tasks and loaders share one cache.
        cached = convert_split(split, transform, src.train_keep if role == "train" else src.test_keep)
        return TaskDataset(split, rows, src.remap[split.targets[rows]], t, transform, seed, cached)

    def _loader(self, ds: TaskDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=False,
            generator=torch.Generator().manual_seed(seed),
            num_workers=self.cfg.num_workers,
            pin_memory=self.cfg.pin_memory,
            collate_fn=collate_batch,
            worker_init_fn=seed_worker,
        )

    def prepare(self, *, unaugmented_train: bool = False) -> None:
        """Run the in-memory fast path's one-off conversion of every split now (see ``convert_split``).

        Every loader of a split shares that conversion, and the first one to be built would otherwise
        pay it inside whichever phase comes first. ``unaugmented_train``: also convert the training
        split with the test transform (the PGP sample loader without augmentation uses it).
        """
        for src in {id(s): s for s in self._sources}.values():
            convert_split(src.data.train, self.train_transform, src.train_keep)
            convert_split(src.data.test, self.test_transform, src.test_keep)
            if unaugmented_train:
                convert_split(src.data.train, self.test_transform, src.train_keep)

    def train_dataset(self, t: int, *, generator_seed: int) -> TaskDataset:
        """The training images of task ``t`` with the train transform (augmentation seeded from
        ``generator_seed``), for loaders that make their own batches (the engine's)."""
        return self._dataset(
            self._check(t), "train", self._tasks[t].train, self.train_transform, derive_seed(generator_seed, 1)
        )

    def train_loader(self, t: int, batch_size: int, *, generator_seed: int) -> DataLoader:
        """Shuffled training data of task ``t``; one iteration is one pass over every sample once.

        In the online setting the engine must iterate it exactly once (``scenario.online``).
        """
        return self._loader(self.train_dataset(t, generator_seed=generator_seed), batch_size, True, generator_seed)

    def test_dataset(self, t: int) -> TaskDataset:
        """The test images of task ``t`` with the test transform."""
        return self._dataset(self._check(t), "test", self._tasks[t].test, self.test_transform, 0)

    def test_loader(self, t: int, batch_size: int) -> DataLoader:
        """Test data of task ``t`` in a fixed order."""
        return self._loader(self.test_dataset(t), batch_size, False, 0)

    def sample_dataset(self, t: int, num_samples: int, *, seed: int, augment: bool) -> TaskDataset:
        """A fixed seeded subset of ``num_samples`` training images of task ``t`` (all if fewer).

        Uses the train transform if ``augment`` (augmentation also seeded by ``seed``), else the test one.
        """
        rows = self._tasks[self._check(t)].train
        if len(rows) > num_samples:
            rows = np.sort(
                np.random.default_rng(derive_seed(seed, 2)).choice(rows, num_samples, replace=False)
            )
        tf = self.train_transform if augment else self.test_transform
        return self._dataset(t, "train", rows, tf, derive_seed(seed, 3))

    def sample_loader(
        self, t: int, num_samples: int, batch_size: int, *, seed: int, augment: bool
    ) -> DataLoader:
        """:meth:`sample_dataset` in a fixed order, ``batch_size`` at a time."""
        return self._loader(self.sample_dataset(t, num_samples, seed=seed, augment=augment), batch_size, False, seed)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for results files."""
        return {
            "dataset": self.dataset_names[0] if len(self.dataset_names) == 1 else self.dataset_names,
            "setting": self.setting,
            "num_tasks": self.num_tasks,
            "num_classes": self.num_classes,
            "class_order": list(self.class_order),
            "task_classes": [list(c) for c in self.task_classes],
            "class_names": list(self.class_names),
            "domain_names": self.domain_names,
            "train_sizes": [len(t.train) for t in self._tasks],
            "test_sizes": [len(t.test) for t in self._tasks],
            "train_transform": repr(self.train_transform),
            "test_transform": repr(self.test_transform),
        }

    def content_digest(self) -> str:
        """A sha256 of what the run trains and tests on: every task's kept labels and, for a few evenly
        spaced samples of each task and split, the image bytes (in memory) or the file's name (on disk).
        A resume or ``pgpcl eval`` compares it, so other labels, other in-memory pixels or other files
        under the same counts are caught. Computed once."""
        if self._digest is None:
            h = hashlib.sha256()
            for task in self._tasks:
                src = self._sources[task.source]
                for split, rows in ((src.data.train, task.train), (src.data.test, task.test)):
                    h.update(src.remap[split.targets[rows]].astype(np.int64).tobytes())
                    for i in rows[np.linspace(0, len(rows) - 1, min(len(rows), _DIGEST_PROBES)).astype(np.int64)]:
                        h.update(_sample_bytes(split, int(i)))
            self._digest = h.hexdigest()
        return self._digest

    def __repr__(self) -> str:
        return f"Scenario({self.setting}, {self.dataset_names}, {self.num_tasks} tasks, {self.num_classes} classes)"


# ----------------------------------------------------------------------------------------------------


_DIGEST_PROBES = 16  # samples per task and split whose content enters Scenario.content_digest


def _sample_bytes(split: DatasetSplit, i: int) -> bytes:
    """Sample ``i``'s content for the digest: its pixels in memory; on disk, its file's name only: the
    folders above it may be moved or renamed (data.root changes on resume), and replacing a corrupt file
    with a good copy (re-extracting) must not stop a resume."""
    if split.images is not None:
        return np.ascontiguousarray(split.images[i]).tobytes()
    return os.fsencode(Path(split.paths[i]).name)  # a name that is not UTF-8 keeps its own bytes


def _source(data: DatasetSplits, remap: np.ndarray, cfg: Any, seed: int, per_domain: bool) -> _Source:
    train_keep = subsample(_groups(data.train, per_domain), cfg.train_per_class, derive_seed(seed, 10))
    test_keep = subsample(_groups(data.test, per_domain), cfg.test_per_class, derive_seed(seed, 11))
    return _Source(data, remap, train_keep, test_keep)


def _class_tasks(src: _Source, task_classes: list[list[int]]) -> list[_Task]:
    train_y = src.remap[src.data.train.targets[src.train_keep]]
    test_y = src.remap[src.data.test.targets[src.test_keep]]
    return [
        _Task(0, src.train_keep[np.isin(train_y, cls)], src.test_keep[np.isin(test_y, cls)])
        for cls in task_classes
    ]


def _domain_tasks(src: _Source, num_tasks: int) -> tuple[list[_Task], list[str]]:
    tr, te = src.data.train, src.data.test
    if tr.domains is None or te.domains is None:
        raise DataError(
            f"setting dil needs domains but {src.data.name} has none; set data.domains=[dataset, ...] "
            "or use image_folder with root/<domain>/{train,test}/<class>/"
        )
    names = src.data.domain_names or [str(d) for d in range(int(tr.domains.max()) + 1)]
    if len(names) != num_tasks:
        raise ConfigError(
            f"{src.data.name} has {len(names)} domains but data.num_tasks={num_tasks}; set data.num_tasks={len(names)}"
        )
    tasks = [
        _Task(
            0, src.train_keep[tr.domains[src.train_keep] == d], src.test_keep[te.domains[src.test_keep] == d]
        )
        for d in range(num_tasks)
    ]
    return tasks, list(names)


def _check_every_class_trains(sources: list[_Source]) -> None:
    """A class without a training image would sit in a task untaught and score as if it were learnt; one
    without a test image would never be measured, its forgetting invisible."""
    for src in sources:
        data = src.data
        for role, split, keep in (("training", data.train, src.train_keep), ("test", data.test, src.test_keep)):
            counts = np.bincount(split.targets[keep], minlength=data.num_classes)
            empty = np.flatnonzero(counts == 0)
            if len(empty):
                raise DataError(
                    f"{data.name}: {len(empty)} of {data.num_classes} classes have no {role} images (e.g. "
                    f"{data.class_names[int(empty[0])]!r}); the dataset is incomplete: re-extract it or point "
                    "data.root at all of it"
                )


def _check_tasks(tasks: list[_Task]) -> None:
    for t, task in enumerate(tasks):
        for role in ("train", "test"):
            if len(getattr(task, role)) == 0:
                raise DataError(
                    f"task {t} has no {role} images; check the dataset files or the task split settings"
                )


def build_scenario(data_cfg: Any, seed: int) -> Scenario:
    """Read the data of ``data_cfg`` and cut it into ``data_cfg.num_tasks`` tasks."""
    cfg = data_cfg
    if cfg.setting not in SETTINGS:
        raise ConfigError(f"data.setting must be one of {list(SETTINGS)}, got {cfg.setting!r}")
    if cfg.num_tasks < 1:
        raise ConfigError(f"data.num_tasks must be >= 1, got {cfg.num_tasks}")
    datasets = _load_sources(cfg)
    order_seed = cfg.order_seed if cfg.order_seed is not None else seed
    if cfg.datasets:
        return _dataset_list_scenario(cfg, datasets, seed, order_seed)
    num_classes = datasets[0].num_classes
    class_order = make_class_order(num_classes, cfg.class_order, order_seed)
    remap = np.empty(num_classes, dtype=np.int64)
    remap[class_order] = np.arange(num_classes)
    dil = cfg.setting == "dil"
    sources = [_source(d, remap, cfg, seed, dil) for d in datasets]
    _check_every_class_trains(sources)
    if not dil:
        sizes = split_classes(num_classes, cfg.num_tasks, cfg.first_task_classes)
        bounds = np.cumsum([0] + sizes)
        task_classes = [list(range(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]
        tasks, domain_names = _class_tasks(sources[0], task_classes), None
    else:
        if cfg.first_task_classes is not None:
            raise ConfigError(
                "data.first_task_classes does not apply to setting dil (every task has all classes); unset it"
            )
        task_classes = [list(range(num_classes))] * cfg.num_tasks
        if len(sources) > 1:
            tasks = [_Task(k, s.train_keep, s.test_keep) for k, s in enumerate(sources)]
            domain_names = [d.name for d in datasets]
            if len(set(domain_names)) < len(domain_names):  # same reader twice: tell them apart by entry
                domain_names = list(cfg.domains)
        else:
            tasks, domain_names = _domain_tasks(sources[0], cfg.num_tasks)
    _check_tasks(tasks)
    names = datasets[0].class_names
    return Scenario(cfg, sources, tasks, class_order, task_classes, domain_names, [names[c] for c in class_order])


def _dataset_list_scenario(cfg: Any, datasets: list[DatasetSplits], seed: int, order_seed: int) -> Scenario:
    """Task ``t`` = dataset ``t`` with all its classes. Dataset ``t``'s original label ``c`` is the global
    original label ``offset_t + c`` (offset_t = classes of the datasets before it); ``class_order=random``
    shuffles the classes within each dataset, never across tasks."""
    class_order, task_classes, sources, tasks, names = [], [], [], [], []
    offset = 0
    for k, data in enumerate(datasets):
        n = data.num_classes
        order = make_class_order(n, cfg.class_order, derive_seed(order_seed, 20, k))
        remap = np.empty(n, dtype=np.int64)
        remap[order] = offset + np.arange(n)
        class_order += [offset + c for c in order]
        task_classes.append(list(range(offset, offset + n)))
        names += [data.class_names[c] for c in order]
        src = _source(data, remap, cfg, seed, False)
        sources.append(src)
        tasks.append(_Task(k, src.train_keep, src.test_keep))
        offset += n
    _check_every_class_trains(sources)
    _check_tasks(tasks)
    return Scenario(cfg, sources, tasks, class_order, task_classes, None, names)
