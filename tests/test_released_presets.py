"""The full-size presets run end to end: the 10- and 20-split CIFAR-100 presets (L2P, DualPrompt,
CODA-Prompt, and the five CLIP learners, with PGP) on generated files in the official ``cifar-100-python``
format, and the ImageNet-R, TinyImageNet and CUB-200 presets on generated folders in those datasets'
layouts, all 200 classes, with only the backbone and the image size shrunk (and CODA-Prompt's pool,
whose 100 orthogonal keys need a width >= 100; the CLIP presets get the small random CLIP)."""

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


def _wnids(n: int = 200) -> list[str]:
    return [f"n{1443537 + 7919 * c:08d}" for c in range(n)]


def _imagenet_r(root, write) -> None:
    """imagenet-r/<wnid>/*.jpg and README.txt; per class one image the shipped 80/20 rule puts in the
    test split and one it puts in the training split."""
    from pgpcl.data.folders import imagenet_r_is_test, load_split_spec

    spec, folder = load_split_spec(), root / "imagenet-r"
    readme = []
    for c, wnid in enumerate(_wnids()):
        names = [f"art_{i}.jpg" for i in range(40)]
        is_test = imagenet_r_is_test([f"{wnid}/{n}" for n in names], spec)
        for n in (names[int(is_test.argmax())], names[int((~is_test).argmax())]):
            write(folder / wnid / n, color=(c % 256, 40, 90))
        readme.append(f"{wnid} class_{c}")
    (folder / "README.txt").write_text("\n".join(readme) + "\n")


def _tiny_imagenet(root, write) -> None:
    """tiny-imagenet-200/: wnids.txt, words.txt, train/<wnid>/images/, val/images/ + val_annotations.txt."""
    folder = root / "tiny-imagenet-200"
    wnids = _wnids()
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tthing {c}, other name\n" for c, w in enumerate(wnids)))
    lines = []
    for c, w in enumerate(wnids):
        write(folder / "train" / w / "images" / f"{w}_0.JPEG", color=(c % 256, 0, 0), size=(64, 64))
        write(folder / "val" / "images" / f"val_{c}.JPEG", color=(c % 256, 0, 0), size=(64, 64))
        lines.append(f"val_{c}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def _cub200(root, write) -> None:
    """CUB_200_2011/: images/<id>.<name>/*.jpg, images.txt, image_class_labels.txt, train_test_split.txt,
    classes.txt."""
    folder = root / "CUB_200_2011"
    images, labels, split = [], [], []
    for c in range(200):
        cls = f"{c + 1:03d}.Bird_{c}"
        for k, is_train in ((2 * c + 1, 1), (2 * c + 2, 0)):
            rel = f"{cls}/Bird_{c}_{k:05d}.jpg"
            write(folder / "images" / rel, color=(c % 256, 120, 0))
            images.append(f"{k} {rel}")
            labels.append(f"{k} {c + 1}")
            split.append(f"{k} {is_train}")
    classes = [f"{c + 1} {c + 1:03d}.Bird_{c}" for c in range(200)]
    for name, rows in (("images", images), ("image_class_labels", labels), ("train_test_split", split),
                       ("classes", classes)):
        (folder / f"{name}.txt").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def folder_roots(tmp_path_factory):
    """dataset name -> a root holding it in its official layout (200 classes; 1 train, 1 test image each)."""
    from PIL import Image

    def write(path, color=(0, 0, 0), size=(12, 10)):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, tuple(color)).save(path)

    roots = {}
    for name, make in (("imagenet_r", _imagenet_r), ("tiny_imagenet", _tiny_imagenet), ("cub200", _cub200)):
        roots[name] = tmp_path_factory.mktemp(name)
        make(roots[name], write)
    return roots


FOLDER_PRESETS = [
    ("imagenet_r_10_l2p_pgp", []),
    ("imagenet_r_10_dualprompt_pgp", []),
    ("imagenet_r_10_coda_prompt_pgp", ["method.pool_size=30"]),
    ("tiny_imagenet_10_l2p_pgp", []),
    ("tiny_imagenet_10_dualprompt_pgp", []),
    ("cub200_5_l2p_pgp", []),
    ("cub200_5_dualprompt_pgp", []),
    *((f"{bench}_clip_pgp", CLIP) for bench in ("imagenet_r_10", "tiny_imagenet_10", "cub200_5")),
]


@pytest.mark.parametrize(("preset", "extra"), FOLDER_PRESETS, ids=[p for p, _ in FOLDER_PRESETS])
def test_released_preset_on_image_folders_trains_every_task(tmp_path, folder_roots, preset, extra):
    cfg = load_config(preset, [*SHRINK, *extra])
    cfg.data.root = str(folder_roots[cfg.data.dataset])
    results = Trainer(cfg, tmp_path / preset).run()
    assert results.status == "complete"
    T = cfg.data.num_tasks
    assert len(results.task_classes) == T and all(len(c) == 200 // T for c in results.task_classes)
    assert all(row[t] is not None for t, row in enumerate(results.acc["cil"]))
    assert {p["task"] for p in results.projection} == set(range(1, T))
    name = {"imagenet_r": "class_{}", "tiny_imagenet": "thing {}", "cub200": "Bird {}"}[cfg.data.dataset]
    assert sorted(results.class_names) == sorted(name.format(c) for c in range(200))  # the readable names


@pytest.mark.parametrize(("preset", "extra"), [
    ("cifar100_10_l2p_pgp", []),
    ("cifar100_10_dualprompt_pgp", []),
    ("cifar100_10_coda_prompt_pgp", ["method.pool_size=30"]),
    ("cifar100_20_l2p_pgp", []),
    ("cifar100_20_dualprompt_pgp", []),
    *((f"cifar100_10_{name}_pgp", CLIP) for name in ("clip", "clip_dual", "clip_adapter", "clip_lora", "clip_prefix")),
    ("cifar100_20_clip_pgp", CLIP),
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
