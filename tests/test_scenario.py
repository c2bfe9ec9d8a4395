"""Scenarios: task splits, class order, settings, loaders; on tiny MNIST-format files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgpcl.config import DataConfig
from pgpcl.data import build_scenario, taskset
from pgpcl.data.scenario import split_classes
from pgpcl.errors import ConfigError, DataError

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2


@pytest.fixture(autouse=True)
def _threads(data_one_thread):
    yield


@pytest.fixture
def mnist_root(tmp_path, data_write_idx):
    """10 classes, interleaved labels, every image encoding its own row index."""
    train = np.tile(np.arange(10), TRAIN_PER_CLASS)
    test = np.tile(np.arange(10), TEST_PER_CLASS)
    return str(data_write_idx(tmp_path / "mnist", train, test))


def _cfg(root: str, **kw) -> DataConfig:
    base = dict(dataset="mnist", root=root, num_tasks=5, img_size=28, channels=1,
                train_transform="plain", test_transform="plain")  # fmt: skip
    return DataConfig(**{**base, **kw})


def _all(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, ts = zip(*loader)
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def _orig_labels(x: torch.Tensor) -> list[int]:
    """The original label written into pixel (1, 0) by the fixture."""
    return ((x[:, 0, 1, 0] * 255).round().long() // 10).tolist()


def test_contiguous_tasks_and_masks(mnist_root):
    sc = build_scenario(_cfg(mnist_root), seed=0)
    assert sc.num_tasks == 5 and sc.num_classes == 10 and sc.setting == "cil" and not sc.online
    assert sc.task_classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sc.class_mask(2).tolist() == [False] * 4 + [True] * 2 + [False] * 4
    assert sc.class_mask(2).dtype == torch.bool
    assert sc.seen_classes(2) == [0, 1, 2, 3, 4, 5]
    for t in range(5):
        _, y, task = _all(sc.train_loader(t, 4, generator_seed=0))
        assert set(y.tolist()) == set(sc.task_classes[t]) and len(y) == 2 * TRAIN_PER_CLASS
        assert (task == t).all()
        _, y, _ = _all(sc.test_loader(t, 3))
        assert set(y.tolist()) == set(sc.task_classes[t]) and len(y) == 2 * TEST_PER_CLASS


def test_first_task_classes(mnist_root):
    sc = build_scenario(_cfg(mnist_root, num_tasks=4, first_task_classes=4), seed=0)
    assert [len(c) for c in sc.task_classes] == [4, 2, 2, 2]
    assert sc.task_classes[1] == [4, 5]
    assert split_classes(100, 6, 50) == [50, 10, 10, 10, 10, 10]
    assert split_classes(10, 1, 10) == [10]
    with pytest.raises(DataError) as err:
        split_classes(10, 2, 10)  # said 'cannot be split into 1 equal tasks; ... divide evenly by 1'
    assert str(err.value) == ("data.first_task_classes=10 leaves 0 of 10 classes for the other 1 task, fewer than "
                              "one each; set data.first_task_classes <= 9")
    with pytest.raises(DataError, match="leaves 2 of 10 classes for the other 3 tasks, fewer than one each; "
                                        r"set data.first_task_classes <= 7"):
        split_classes(10, 4, 8)
    assert split_classes(10, 2, 9) == [9, 1]


def test_a_task_of_one_class_is_noted_its_til_accuracy_means_nothing(mnist_root):
    assert not [n for n in build_scenario(_cfg(mnist_root), seed=0).notes if "one class" in n]
    sc = build_scenario(_cfg(mnist_root, num_tasks=10), seed=0)
    assert "every task has one class, so TIL accuracy there is 100% by construction; read CIL" in sc.notes
    sc = build_scenario(_cfg(mnist_root, num_tasks=2, first_task_classes=9), seed=0)
    assert "task(s) 2 have one class, so TIL accuracy there is 100% by construction; read CIL" in sc.notes


def test_not_divisible_is_one_line_error(mnist_root):
    with pytest.raises(DataError) as err:
        split_classes(100, 7, None)
    assert str(err.value) == (
        "100 classes cannot be split into 7 equal tasks; choose num_tasks dividing 100 or set data.first_task_classes"
    )
    with pytest.raises(DataError, match="10 classes cannot be split into 3 equal tasks"):
        build_scenario(_cfg(mnist_root, num_tasks=3), seed=0)
    with pytest.raises(DataError, match="first_task_classes=3"):
        build_scenario(_cfg(mnist_root, num_tasks=3, first_task_classes=3), seed=0)
    with pytest.raises(DataError) as err:
        split_classes(10, 1, 12)
    assert str(err.value) == (
        "data.first_task_classes=12 is outside 1..10 (the dataset has 10 classes); choose a value in that range"
    )
    with pytest.raises(DataError, match="with data.num_tasks=1 leaves 6 of 10 classes in no task; with one task "
                                        "set data.first_task_classes=10 or leave it out"):
        split_classes(10, 1, 4)  # said 'cannot be split into 0 equal tasks'
    assert split_classes(10, 1, 10) == [10]


def test_random_order_recorded_reproducible_and_remapped(mnist_root):
    a = build_scenario(_cfg(mnist_root, class_order="random"), seed=1)
    b = build_scenario(_cfg(mnist_root, class_order="random"), seed=1)
    c = build_scenario(_cfg(mnist_root, class_order="random"), seed=2)
    d = build_scenario(_cfg(mnist_root, class_order="random", order_seed=1), seed=2)
    assert a.class_order == b.class_order == d.class_order != c.class_order
    assert sorted(a.class_order) == list(range(10)) and a.class_order != list(range(10))
    assert a.class_names == [str(k) for k in a.class_order]
    x, y, _ = _all(a.train_loader(0, 5, generator_seed=0))
    assert [a.class_order[k] for k in y.tolist()] == _orig_labels(x)  # class_order[i] -> i


def test_online_single_pass_each_index_once(mnist_root, data_decode_index):
    sc = build_scenario(_cfg(mnist_root, setting="online"), seed=0)
    assert sc.online
    for t in range(sc.num_tasks):
        x, _, _ = _all(sc.train_loader(t, 5, generator_seed=3))
        seen = data_decode_index(x)
        assert sorted(seen) == sorted(sc.train_indices(t).tolist())
        assert len(seen) == len(set(seen))


def test_loader_dtypes_shapes_and_no_drop_last(mnist_root):
    sc = build_scenario(
        _cfg(mnist_root, img_size=32, channels=3, train_transform="vit", test_transform="vit"), seed=0
    )
    batches = list(sc.train_loader(1, 5, generator_seed=0))
    assert [len(b[0]) for b in batches] == [5, 5, 2]
    x, y, task = batches[0]
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and task.dtype == torch.int64 and task.tolist() == [1] * 5
    x, y, _ = next(iter(sc.test_loader(1, 64)))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def test_train_loader_reproducible_with_augmentation(mnist_root):
    sc = build_scenario(_cfg(mnist_root, img_size=24, train_transform="vit"), seed=0)
    a = _all(sc.train_loader(0, 4, generator_seed=7))
    b = _all(sc.train_loader(0, 4, generator_seed=7))
    c = _all(sc.train_loader(0, 4, generator_seed=8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_sample_loader_reproducible(mnist_root, data_decode_index):
    sc = build_scenario(_cfg(mnist_root, num_tasks=2), seed=0)
    a, _, _ = _all(sc.sample_loader(0, 7, 3, seed=11, augment=False))
    b, _, _ = _all(sc.sample_loader(0, 7, 3, seed=11, augment=False))
    c, _, _ = _all(sc.sample_loader(0, 7, 3, seed=12, augment=False))
    assert torch.equal(a, b) and len(a) == 7
    assert set(data_decode_index(a)) <= set(sc.train_indices(0).tolist())
    assert data_decode_index(a) != data_decode_index(c)
    everything, _, _ = _all(sc.sample_loader(0, 1000, 8, seed=0, augment=False))
    assert len(everything) == len(sc.train_indices(0))
    vit = build_scenario(_cfg(mnist_root, num_tasks=2, img_size=24, train_transform="vit"), seed=0)
    u, _, _ = _all(vit.sample_loader(1, 5, 2, seed=4, augment=True))
    v, _, _ = _all(vit.sample_loader(1, 5, 2, seed=4, augment=True))
    assert torch.equal(u, v)


def test_per_class_subsampling(mnist_root):
    sc = build_scenario(_cfg(mnist_root, train_per_class=2, test_per_class=1), seed=0)
    _, y, _ = _all(sc.train_loader(0, 50, generator_seed=0))
    assert sorted(y.tolist()) == [0, 0, 1, 1]
    _, y, _ = _all(sc.test_loader(4, 50))
    assert sorted(y.tolist()) == [8, 9]
    again = build_scenario(_cfg(mnist_root, train_per_class=2, test_per_class=1), seed=0)
    assert np.array_equal(again.train_indices(3), sc.train_indices(3))


def test_dil_two_datasets(tmp_path, data_write_idx):
    a = data_write_idx(tmp_path / "a", np.tile(np.arange(10), 2), np.arange(10))
    b = data_write_idx(tmp_path / "b", np.tile(np.arange(10), 3), np.arange(10))
    cfg = _cfg(None, setting="dil", num_tasks=2, domains=[f"mnist={a}", f"fashion_mnist={b}"])
    sc = build_scenario(cfg, seed=0)
    assert sc.task_classes == [list(range(10))] * 2 and sc.domain_names == ["mnist", "fashion_mnist"]
    assert sc.seen_classes(0) == list(range(10)) and sc.class_mask(1).all()
    assert len(_all(sc.train_loader(0, 8, generator_seed=0))[1]) == 20
    x, y, t = _all(sc.train_loader(1, 8, generator_seed=0))
    assert len(y) == 30 and (t == 1).all()
    assert sc.describe()["dataset"] == ["mnist", "fashion_mnist"]


def test_dil_image_folder_domains(tmp_path, data_write_image):
    for k, dom in enumerate(("photo", "sketch")):
        for role, n in (("train", 3), ("test", 1)):
            for c, cls in enumerate(("cat", "dog")):
                for i in range(n):
                    data_write_image(tmp_path / dom / role / cls / f"{i}.png", color=(100 * k, 100 * c, 0))
    cfg = DataConfig(dataset="image_folder", root=str(tmp_path), setting="dil", num_tasks=2, img_size=8,
                     train_transform="plain", test_transform="vit")  # fmt: skip
    sc = build_scenario(cfg, seed=0)
    assert sc.domain_names == ["photo", "sketch"] and sc.task_classes == [[0, 1], [0, 1]]
    x, y, t = _all(sc.test_loader(1, 8))
    assert x.shape == (2, 3, 8, 8) and sorted(y.tolist()) == [0, 1] and (t == 1).all()
    assert torch.allclose(x[:, 0].mean((1, 2)), torch.tensor([100 / 255] * 2), atol=0.02)  # sketch is red 100
    with pytest.raises(ConfigError, match="num_tasks=2"):
        build_scenario(DataConfig(**{**cfg.__dict__, "num_tasks": 3}), seed=0)


def test_dil_errors(mnist_root, tmp_path, data_write_image):
    for role in ("train", "test"):
        for cls in ("cat", "dog"):
            data_write_image(tmp_path / "pets" / role / cls / "a.png")
    mixed = [f"mnist={mnist_root}", f"image_folder={tmp_path / 'pets'}"]
    with pytest.raises(DataError, match="same number of classes"):
        build_scenario(_cfg(None, setting="dil", num_tasks=2, domains=mixed), seed=0)
    with pytest.raises(DataError, match="has none"):
        build_scenario(_cfg(mnist_root, setting="dil", num_tasks=1), seed=0)
    with pytest.raises(ConfigError, match="only applies to data.setting=dil"):
        build_scenario(_cfg(mnist_root, domains=["mnist"]), seed=0)


def test_fast_path_matches_per_item(mnist_root, monkeypatch):
    cfg = _cfg(mnist_root, img_size=20, channels=3, test_transform="vit", normalize="imagenet")
    fast = build_scenario(cfg, seed=0)
    xf, yf, _ = _all(fast.test_loader(2, 3))
    assert fast._sources[0].data.test.cache  # converted once, kept on the split
    monkeypatch.setattr(taskset, "FAST_PATH_MAX_BYTES", 0)
    slow = build_scenario(cfg, seed=0)
    xs, ys, _ = _all(slow.test_loader(2, 3))
    assert not slow._sources[0].data.test.cache
    assert torch.equal(yf, ys) and torch.allclose(xf, xs, atol=1e-6)


def test_prepare_converts_every_split_once_and_loaders_reuse_it(mnist_root):
    sc = build_scenario(_cfg(mnist_root, num_tasks=2), seed=0)
    src = sc._sources[0].data
    sc.prepare(unaugmented_train=True)
    train_cache, test_cache = dict(src.train.cache), dict(src.test.cache)
    assert len(train_cache) == 1 and len(test_cache) == 1  # plain train and test geometry coincide
    x = _all(sc.test_loader(1, 3))[0]
    _all(sc.train_loader(1, 4, generator_seed=0))
    _all(sc.sample_loader(1, 5, 2, seed=0, augment=False))
    for split, before in ((src.train, train_cache), (src.test, test_cache)):
        assert {k: id(v) for k, v in split.cache.items()} == {k: id(v) for k, v in before.items()}
    fresh = build_scenario(_cfg(mnist_root, num_tasks=2), seed=0)  # converts on first use instead
    assert torch.equal(x, _all(fresh.test_loader(1, 3))[0])


def test_in_process_loader_yields_what_a_dataloader_yields(mnist_root):
    from torch.utils.data import DataLoader

    from pgpcl.engine.distributed import InProcessLoader, make_loader

    cfg = _cfg(mnist_root, num_tasks=2, img_size=24, train_transform="vit")  # augmenting: per-item seeds
    ds = build_scenario(cfg, seed=0).train_loader(0, 4, generator_seed=0).dataset
    batches = [[(i, 100 + i) for i in range(s, min(s + 4, len(ds)))] for s in range(0, len(ds), 4)]
    fast = make_loader(ds, batches, cfg, seed=0)
    assert isinstance(fast, InProcessLoader) and len(fast) == len(batches)
    pinned = make_loader(ds, batches, DataConfig(**{**cfg.__dict__, "pin_memory": True}), seed=0)
    assert isinstance(pinned, DataLoader)
    for a, b in zip(_all(fast), _all(DataLoader(fast.dataset, batch_sampler=batches, collate_fn=lambda b: b))):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(_all(fast), _all(fast)))  # re-iterable, same draws


def test_workers_and_pin_memory_reproducible(mnist_root):
    sc = build_scenario(_cfg(mnist_root, img_size=24, train_transform="vit", num_workers=1), seed=0)
    a = _all(sc.train_loader(0, 4, generator_seed=5))
    b = _all(sc.train_loader(0, 4, generator_seed=5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_describe_is_json(mnist_root):
    sc = build_scenario(_cfg(mnist_root, class_order="random", first_task_classes=2, num_tasks=5), seed=3)
    d = json.loads(json.dumps(sc.describe()))
    assert d["setting"] == "cil" and d["num_tasks"] == 5 and d["class_order"] == sc.class_order
    assert d["task_classes"][0] == [0, 1] and len(d["class_names"]) == 10
    assert d["train_sizes"] == [2 * TRAIN_PER_CLASS] * 5


def test_dil_domains_entries_are_one_domain_each(mnist_root, tmp_path, data_write_image):
    # a folder with domains of its own would make one task of two domains; an entry twice, two equal tasks
    for domain in ("plain", "inverted"):
        for role in ("train", "test"):
            for cls in range(10):
                data_write_image(tmp_path / "nested" / domain / role / str(cls) / "a.png")
    nested = [f"mnist={mnist_root}", f"image_folder={tmp_path / 'nested'}"]
    with pytest.raises(DataError, match="holds 2 domains of its own; list one folder per domain"):
        build_scenario(_cfg(None, setting="dil", num_tasks=2, domains=nested), seed=0)
    with pytest.raises(ConfigError, match=f"lists 'mnist={mnist_root}' twice"):
        build_scenario(_cfg(None, setting="dil", num_tasks=2, domains=[f"mnist={mnist_root}"] * 2), seed=0)


# ----------------------------------------------------------------------------------------------------
# data.datasets: one dataset per task, classes side by side


def test_one_dataset_per_task_numbers_classes_after_the_datasets_before(tmp_path, data_write_idx, data_write_image):
    digits = data_write_idx(tmp_path / "digits", np.tile(np.arange(10), 2), np.arange(10))
    for role in ("train", "test"):
        for cls in ("cat", "dog", "owl"):
            data_write_image(tmp_path / "pets" / role / cls / "a.png")
    cfg = _cfg(None, num_tasks=2, datasets=[f"mnist={digits}", f"image_folder={tmp_path / 'pets'}"])
    sc = build_scenario(cfg, seed=0)
    assert sc.num_classes == 13 and sc.task_classes == [list(range(10)), [10, 11, 12]]
    assert sc.class_names == [str(d) for d in range(10)] + ["cat", "dog", "owl"]
    x, y, t = _all(sc.train_loader(0, 8, generator_seed=0))
    assert sorted(y.tolist()) == sorted(_orig_labels(x)) and len(y) == 20 and (t == 0).all()
    x, y, t = _all(sc.test_loader(1, 8))
    assert x.shape == (3, 1, 28, 28) and sorted(y.tolist()) == [10, 11, 12] and (t == 1).all()
    assert sc.describe()["dataset"] == ["mnist", "image_folder"]
    shuffled = build_scenario(_cfg(None, num_tasks=2, datasets=cfg.datasets, class_order="random"), seed=3)
    assert sorted(shuffled.class_order[:10]) == list(range(10)) and shuffled.class_order[:10] != list(range(10))
    assert sorted(shuffled.class_order[10:]) == [10, 11, 12]  # shuffled within each dataset, never across
    x, y, _ = _all(shuffled.train_loader(0, 8, generator_seed=0))
    assert [shuffled.class_order[int(c)] for c in y] == _orig_labels(x)


def test_dataset_list_errors(mnist_root):
    two = [f"mnist={mnist_root}", f"fashion_mnist={mnist_root}"]
    cases = [
        (dict(num_tasks=3, datasets=two), "data.datasets lists 2 datasets but data.num_tasks=3"),
        (dict(num_tasks=2, datasets=two, setting="dil"), "list them under data.domains"),
        (dict(num_tasks=2, datasets=two, first_task_classes=4), "first_task_classes does not apply"),
        (dict(num_tasks=2, datasets=two, domains=two), "cannot both be set"),
        (dict(num_tasks=2, datasets=[two[0], two[0]]), f"data.datasets lists {two[0]!r} twice"),
    ]
    for kw, phrase in cases:
        with pytest.raises(ConfigError) as err:
            build_scenario(_cfg(None, **kw), seed=0)
        assert phrase in str(err.value)
