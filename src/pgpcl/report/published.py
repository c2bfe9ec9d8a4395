"""The PGP paper's published numbers, and which run groups they describe.

Qiao et al., ICLR 2024, as collected in the design note (section 6): class-incremental final average
accuracy and forgetting (%) with ViT-B/16 pretrained on ImageNet-21k. A group is matched only when its
runs are that setting: the same dataset and number of tasks, method, PGP on or off, setting ``cil``,
and the unmodified ``vit_base_patch16_224`` with pretrained weights (no size overrides; from the hub,
only the ImageNet-21k tags), and every other result-changing key as the released preset has it
(``cifar100_10_l2p_pgp`` etc.: epochs, learning rate, class order, ``train.max_steps_per_task``, ...;
only where the data and weights are read from, and speed or memory settings such as batch sizes of
evaluation and of the basis pass, compilation and the attention kernel, may differ); anything else would
compare different experiments. The CLIP numbers are left out: the released code evaluated them with the
true labels' task (docs/pgp.md, section 10), so they are not comparable to pgpcl's CIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pgpcl.config import with_defaults
from pgpcl.engine.metrics import released_forgetting
from pgpcl.engine.results import Results
from pgpcl.report.runs import RunGroup, Stat, flat_config, flatten_config, result_items

SOURCE = "Qiao et al., ICLR 2024 (PGP): CIL, ViT-B/16 ImageNet-21k"
FORGETTING_NOTE = ("forgetting in this section is the released code's (max over every t <= T, so never "
                   "negative), as the paper's is; the main table's is lower when a task ends above its earlier accuracies")

# (dataset, num_tasks, method, pgp) -> (final accuracy, forgetting)
PUBLISHED: dict[tuple[str, int, str, bool], tuple[float, float]] = {
    ("cifar100", 10, "l2p", False): (83.77, 6.63),
    ("cifar100", 10, "l2p", True): (84.34, 5.59),
    ("cifar100", 10, "dualprompt", False): (86.50, 5.77),
    ("cifar100", 10, "dualprompt", True): (86.92, 5.35),
    ("cifar100", 20, "l2p", False): (71.29, 13.96),
    ("cifar100", 20, "l2p", True): (76.12, 13.26),
    ("cifar100", 20, "dualprompt", False): (82.98, 8.20),
    ("cifar100", 20, "dualprompt", True): (83.74, 7.91),
    ("imagenet_r", 10, "l2p", False): (60.44, 9.00),
    ("imagenet_r", 10, "l2p", True): (61.40, 8.03),
    ("imagenet_r", 10, "dualprompt", False): (68.13, 4.46),
    ("imagenet_r", 10, "dualprompt", True): (69.34, 4.53),
    ("cub200", 5, "dualprompt", False): (82.02, 4.23),
    ("cub200", 5, "dualprompt", True): (82.46, 3.76),
}
_SIZE_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
_IN21K_TAGS = ("augreg_in21k", "orig_in21k")


@dataclass(frozen=True)
class Published:
    final_acc: float
    forgetting: float
    source: str = SOURCE

    def to_dict(self) -> dict:
        return {"cil_final": self.final_acc, "cil_forgetting": self.forgetting, "source": self.source}


def released_forgetting_stat(group: RunGroup) -> Stat:
    """The group's CIL forgetting over seeds by the released definition, which the published numbers
    use: pgpcl's own (``max`` over ``t < T``) goes negative for a task whose final accuracy is its best,
    and subtracting the paper's number from it would credit that gain as less forgetting."""
    return Stat.of([released_forgetting(run.results.acc["cil"]) for run in group.runs])  # cil: always a matrix


def published_for(r: Results) -> Published | None:
    """The published numbers of the experiment ``r`` is a run of, or None."""
    if r.setting != "cil":
        return None
    backbone = with_defaults(r.config).get("backbone", {})
    if backbone.get("arch") != "vit_base_patch16_224" or backbone.get("weights") is None:
        return None
    if any(backbone.get(k) is not None for k in _SIZE_KEYS):
        return None
    if backbone["weights"] == "hub" and backbone.get("pretrained_tag") not in _IN21K_TAGS:
        return None  # other pretraining (e.g. fine-tuned on ImageNet-1k); a local file cannot be told apart
    key = (r.dataset, r.num_tasks, r.method, bool(r.pgp))
    found = PUBLISHED.get(key)
    if found is None or _first_change(r, dict(_released_config(key))) is not None:
        return None
    return Published(*found)


_SOURCES = frozenset({"backbone.weights", "backbone.pretrained_tag", "data.root"})
"""Where the weights and the data are read from: checked above, or not part of the experiment."""
_SPEED = frozenset({"train.eval_batch_size", "pgp.sample_batch_size", "backbone.compile", "backbone.compile_backend",
                    "backbone.fused_attention", "train.deterministic"})
"""Settings people change to fit memory or run faster: they change rounding, not the experiment."""
_PGP_ARITHMETIC = frozenset({"pgp.mode"})
"""pgp.mode=reference is the released arithmetic, the one the paper's numbers come from, and feature is pgpcl's:
either is the published experiment (the group's label says which a run used)."""


@cache
def _released_config(key: tuple[str, int, str, bool]) -> tuple[tuple[str, str], ...]:
    """The result-changing entries of the flattened config of the built-in full-size preset of the
    published experiment ``key`` (a CIL setting)."""
    from pgpcl.config import list_presets, load_config

    for name in list_presets():
        if name.startswith("demo_") or (name.startswith("tiny_") and not name.startswith("tiny_imagenet")):
            continue  # the offline presets (tiny_imagenet_* are full-size TinyImageNet ones)
        cfg = load_config(name)
        if (cfg.data.dataset, cfg.data.num_tasks, cfg.method.name, cfg.pgp.enabled) == key:
            flat = flatten_config(with_defaults(cfg.to_dict()))
            return tuple(sorted(result_items(flat, cfg.pgp.enabled, "cil").items()))
    return ()


def _first_change(r: Results, released: dict[str, str]) -> str | None:
    """The first result-changing key in which run ``r`` differs from the released preset, or None."""
    if not released:
        return "no released preset"
    run = result_items(flat_config(r), r.pgp, r.setting)
    for k in sorted(set(run) | set(released)):
        if k not in _SOURCES | _SPEED | _PGP_ARITHMETIC and run.get(k) != released.get(k):
            return k
    return None
