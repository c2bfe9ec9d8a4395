"""The full-size presets run end to end: the 10- and 20-split CIFAR-100 presets (L2P, DualPrompt,
CODA-Prompt, and the five CLIP learners, with PGP) on generated files in the official ``cifar-100-python``
format, with only the backbone and the image size shrunk (and CODA-Prompt's pool, whose 100 orthogonal
keys need a width >= 100; the CLIP presets get the small random CLIP)."""

from __future__ import annotations

import numpy as np
import pytest

from pgpcl.config import load_config
from pgpcl.engine.trainer import Trainer
from test_data import _py2

SHRINK = ["backbone.weights=null", "backbone.img_size=32", "backbone.patch_size=8", "backbone.embed_dim=32",
          "backbone.depth=5", "backbone.num_heads=2", "data.img_size=32", "train.epochs=1", "train.batch_size=16",
          "pgp.num_samples=16", "train.device=cpu", "data.num_workers=0", "train.progress=false",
          "train.eval_batch_size=100"]
CLIP = ["backbone.arch=pgpcl-tiny-clip", "backbone.img_size=null", "backbone.patch_size=null",
        "backbone.embed_dim=null", "backbone.depth=null", "backbone.num_heads=null", "data.img_size=16"]
pytestmark = pytest.mark.usefixtures("data_one_thread")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """100 classes, 2 training and 1 test image each, random pixels."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def split(per_class: int, label: bytes) -> dict:
        labels = [c for c in range(100) for _ in range(per_class)]
        return {b"filenames": [b"x.png"] * len(labels), b"batch_label": label, b"fine_labels": labels,
                b"coarse_labels": [0] * len(labels), b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)}

    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)], b"coarse_label_names": [b"x"]}
    for name, obj in (("train", split(2, b"training")), ("test", split(1, b"testing")), ("meta", meta)):
        (folder / name).write_bytes(b"\x80\x02" + _py2(obj) + b".")
    return root


@pytest.mark.parametrize(("preset", "extra"), [
    ("cifar100_10_l2p_pgp", []),
    ("cifar100_10_dualprompt_pgp", []),
    ("cifar100_10_coda_prompt_pgp", ["method.pool_size=30"]),
    ("cifar100_20_l2p_pgp", []),
    ("cifar100_20_dualprompt_pgp", []),
    *((f"cifar100_10_{name}_pgp", CLIP) for name in ("clip", "clip_dual", "clip_adapter", "clip_lora", "clip_prefix")),
])
def test_released_preset_trains_every_task(tmp_path, cifar_root, preset, extra):
    cfg = load_config(preset, [f"data.root={cifar_root}", *SHRINK, *extra])
    results = Trainer(cfg, tmp_path / preset).run()
    assert results.status == "complete"
    T = cfg.data.num_tasks
    cil = results.acc["cil"]
    assert T in (10, 20) and len(cil) == T and all(row[t] is not None for t, row in enumerate(cil))
    projected = {p["task"] for p in results.projection}
    assert projected == set(range(1, T))  # every task after the first, every group
    assert len(results.projection) == (T - 1) * len({p["group"] for p in results.projection})
