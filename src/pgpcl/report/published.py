"""The PGP paper's published numbers, and which run groups they describe.

Qiao et al., ICLR 2024, as collected in the design note (section 6): class-incremental final average
accuracy and forgetting (%) with ViT-B/16 pretrained on ImageNet-21k. A group is matched only when its
runs are that setting: the same dataset and number of tasks, method, PGP on or off, setting ``cil``,
and the unmodified ``vit_base_patch16_224`` with pretrained weights (no size overrides; from the hub,
only the ImageNet-21k tags); anything else would compare different experiments. The CLIP numbers are left out: the released code evaluated them
with the true labels' task (docs/pgp.md, section 10), so they are not comparable to pgpcl's CIL.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgpcl.config import with_defaults
from pgpcl.engine.results import Results

SOURCE = "Qiao et al., ICLR 2024 (PGP): CIL, ViT-B/16 ImageNet-21k"

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
    found = PUBLISHED.get((r.dataset, r.num_tasks, r.method, bool(r.pgp)))
    return None if found is None else Published(*found)
