"""The CIFAR-10, SVHN, KMNIST, EMNIST and DomainNet readers, on tiny files written in the real formats."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import _idx_bytes
from pgpcl.cli import main
from pgpcl.config import DataConfig
from pgpcl.data import build_scenario, read_dataset
from pgpcl.data.cifar import read_cifar10
from pgpcl.errors import DataError
from test_data import _one_line, _py2

# ----------------------------------------------------------------------------------------------------
# CIFAR-10


def _cifar10_batch(n: int, first_label: int) -> dict:
    data = np.zeros((n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(n) + 10 * first_label  # red channel of the top-left pixel tells rows apart
    data[:, 1024], data[:, 2048] = 7, 9  # green and blue planes
    return {b"batch_label": b"batch", b"labels": [(first_label + i) % 3 for i in range(n)], b"data": data,
            b"filenames": [b"x.png"] * n}  # fmt: skip


def _write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    members = {f"data_batch_{i}": _cifar10_batch(2, i) for i in range(1, 6)}
    members["test_batch"] = _cifar10_batch(3, 0)
    members["batches.meta"] = {b"label_names": [b"airplane", b"automobile", b"bird"], b"num_vis": 3072}
    for name, obj in members.items():
        (folder / name).write_bytes(b"\x80\x02" + _py2(obj) + b".")  # Python 2's cPickle, as the official files
    return folder


def test_cifar10_reads_the_five_batches_in_order(tmp_path):
    _write_cifar10(tmp_path)
    ds = read_dataset("cifar10", str(tmp_path))
    assert ds.name == "cifar10" and ds.class_names == ["airplane", "automobile", "bird"]
    assert ds.train.images.shape == (10, 32, 32, 3) and ds.test.images.shape == (3, 32, 32, 3)
    assert ds.train.images[:, 0, 0, 0].tolist() == [10, 11, 20, 21, 30, 31, 40, 41, 50, 51]
    assert list(ds.train.images[0, 0, 0]) == [10, 7, 9]  # planar rows became HWC
    assert ds.train.targets.tolist() == [1, 2, 2, 0, 0, 1, 1, 2, 2, 0]


def test_cifar10_from_tar_gz_checks_md5(tmp_path):
    _write_cifar10(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    tgz = root / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(DataError) as err:
        read_cifar10(str(root), False)
    assert "expected c58f30108f718f92721af3b95e74349a" in _one_line(err)
    assert not (root / "cifar-10-batches-py").exists()
    ds = read_cifar10(str(root), False, md5=hashlib.md5(tgz.read_bytes()).hexdigest())
    assert len(ds.train) == 10 and (root / "cifar-10-batches-py" / "batches.meta").is_file()


def test_cifar10_missing_or_a_cifar100_pickle_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        read_dataset("cifar10", str(tmp_path))
    assert "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}" in _one_line(err)
    assert "cifar-10-python.tar.gz" in str(err.value)
    folder = _write_cifar10(tmp_path)
    batch = _cifar10_batch(2, 0)
    batch[b"fine_labels"] = batch.pop(b"labels")
    (folder / "data_batch_3").write_bytes(b"\x80\x02" + _py2(batch) + b".")
    with pytest.raises(DataError) as err:
        read_dataset("cifar10", str(tmp_path))
    assert "data_batch_3 lacks key b'labels'; it is not the CIFAR-10 python version" in _one_line(err)


# ----------------------------------------------------------------------------------------------------
# SVHN

scipy_io = pytest.importorskip("scipy.io")


def _write_svhn(folder: Path, n_train: int = 5, n_test: int = 3, compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = np.zeros((32, 32, 3, n), dtype=np.uint8)
        x[0, 1, 2, :] = np.arange(n) + 1  # image i: pixel row 0, column 1, blue = i + 1
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, as the official files
        y[-1] = 10  # the digit 0
        scipy_io.savemat(folder / name, {"X": x, "y": y}, do_compression=compress)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_svhn_mat_files(tmp_path, compress):
    _write_svhn(tmp_path / "svhn", compress=compress)
    ds = read_dataset("svhn", str(tmp_path))
    assert ds.train.images.shape == (5, 32, 32, 3) and ds.test.images.shape == (3, 32, 32, 3)
    assert ds.train.images[:, 0, 1, 2].tolist() == [1, 2, 3, 4, 5]  # (H, W, C, N) became (N, H, W, C)
    assert ds.train.targets.tolist() == [1, 2, 3, 4, 0] and ds.test.targets.tolist() == [1, 2, 0]
    assert ds.class_names == [str(d) for d in range(10)]


def test_svhn_bad_files_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        read_dataset("svhn", str(tmp_path))
    assert "put train_32x32.mat and test_32x32.mat there" in _one_line(err)
    folder = _write_svhn(tmp_path)
    (folder / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, but then nothing useful")
    with pytest.raises(DataError) as err:
        read_dataset("svhn", str(tmp_path))
    assert "test_32x32.mat cannot be read as a MATLAB file" in _one_line(err)
    scipy_io.savemat(folder / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]])})
    with pytest.raises(DataError) as err:
        read_dataset("svhn", str(tmp_path))
    assert "labels span 0..3, expected 1..10" in _one_line(err)
    scipy_io.savemat(folder / "test_32x32.mat", {"images": np.zeros((2, 2), np.uint8)})
    with pytest.raises(DataError) as err:
        read_dataset("svhn", str(tmp_path))
    assert "lacks the variables X and y" in _one_line(err)
    scipy_io.savemat(folder / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array(["a", "b"])})
    with pytest.raises(DataError) as err:
        read_dataset("svhn", str(tmp_path))
    assert "test_32x32.mat: y holds <U1 values, expected the whole numbers 1..10" in _one_line(err)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(DataError) as err:
        read_dataset("svhn", str(tmp_path))
    assert "needs scipy: pip install scipy" in _one_line(err)


# ----------------------------------------------------------------------------------------------------
# KMNIST


def test_kmnist_idx_and_npz_give_the_same_dataset(tmp_path, data_write_idx):
    data_write_idx(tmp_path / "idx", [0, 9, 3], [5, 1])
    a = read_dataset("kmnist", str(tmp_path / "idx"))
    npz = tmp_path / "npz"
    npz.mkdir()
    for role, split in (("train", a.train), ("test", a.test)):
        np.savez_compressed(npz / f"kmnist-{role}-imgs.npz", split.images)  # the official files' key: arr_0
        np.savez_compressed(npz / f"kmnist-{role}-labels.npz", split.targets.astype(np.uint8))
    b = read_dataset("kmnist", str(npz))
    assert a.class_names == b.class_names == ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
    for sa, sb in ((a.train, b.train), (a.test, b.test)):
        assert np.array_equal(sa.images, sb.images) and sa.targets.tolist() == sb.targets.tolist()
    np.savez(npz / "kmnist-test-labels.npz", np.array([{"x": 1}, 2], dtype=object))  # needs a pickle to load
    with pytest.raises(DataError) as err:
        read_dataset("kmnist", str(npz))
    assert "kmnist-test-labels.npz is not a KMNIST .npz file" in _one_line(err)
    whole = (npz / "kmnist-train-imgs.npz").read_bytes()
    (npz / "kmnist-train-imgs.npz").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    with pytest.raises(DataError) as err:
        read_dataset("kmnist", str(npz))
    assert "kmnist-train-imgs.npz is not a KMNIST .npz file" in _one_line(err) and "fetch it again" in str(err.value)
    np.savez_compressed(npz / "kmnist-train-imgs.npz", a.train.images)
    np.savez_compressed(npz / "kmnist-test-labels.npz", np.array([-1, 3], dtype=np.int8))
    with pytest.raises(DataError) as err:
        read_dataset("kmnist", str(npz))
    assert "kmnist-test-labels.npz: labels span -1..3, expected 0..9" in _one_line(err)


# ----------------------------------------------------------------------------------------------------
# EMNIST


def _emnist_images(labels: list[int]) -> np.ndarray:
    """As stored: transposed. Image i has pixel (row 0, column i + 1) lit in the file, so (i + 1, 0) upright."""
    img = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    for i in range(len(labels)):
        img[i, 0, i + 1] = 200
    return img


def _write_emnist(folder: Path, split: str, train: list[int], test: list[int]) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    members = {}
    for role, labels in (("train", train), ("test", test)):
        arrays = {"images-idx3": _emnist_images(labels), "labels-idx1": np.asarray(labels, dtype=np.uint8)}
        for part, arr in arrays.items():
            name = f"emnist-{split}-{role}-{part}-ubyte.gz"
            members[name] = gzip.compress(_idx_bytes(arr))
            (folder / name).write_bytes(members[name])
    return members


def test_emnist_letters_upright_and_from_1(tmp_path):
    _write_emnist(tmp_path / "gzip", "letters", [1, 26, 2], [3])
    ds = read_dataset("emnist_letters", str(tmp_path))
    assert ds.name == "emnist_letters" and len(ds.class_names) == 26 and ds.class_names[:2] == ["Aa", "Bb"]
    assert ds.train.targets.tolist() == [0, 25, 1] and ds.test.targets.tolist() == [2]
    assert [int(np.argmax(ds.train.images[i, :, 0])) for i in range(3)] == [1, 2, 3]  # transposed back


def test_emnist_straight_from_the_official_zip(tmp_path):
    members = _write_emnist(tmp_path / "folder", "balanced", [0, 46, 10], [36])
    with zipfile.ZipFile(tmp_path / "gzip.zip", "w") as z:
        for name, raw in members.items():
            z.writestr(f"gzip/{name}", raw)
    a, b = read_dataset("emnist_balanced", str(tmp_path / "folder")), read_dataset("emnist_balanced", str(tmp_path))
    assert np.array_equal(a.train.images, b.train.images) and a.train.targets.tolist() == [0, 46, 10]
    assert [a.class_names[i] for i in (0, 10, 36, 46)] == ["0", "A", "a", "t"]
    with pytest.raises(DataError) as err:
        read_dataset("emnist_digits", str(tmp_path))
    assert "lacks gzip/emnist-digits-train-images-idx3-ubyte.gz; it is not the EMNIST gzip.zip" in _one_line(err)


def test_emnist_damaged_or_missing_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        read_dataset("emnist_byclass", str(tmp_path))
    assert "put the official gzip.zip" in _one_line(err)
    raw = bytearray(gzip.compress(_idx_bytes(np.zeros((2, 28, 28), np.uint8)), compresslevel=0))
    with zipfile.ZipFile(tmp_path / "gzip.zip", "w") as z:
        z.writestr("gzip/emnist-mnist-train-images-idx3-ubyte.gz", bytes(raw))
    blob = bytearray((tmp_path / "gzip.zip").read_bytes())
    blob[100] ^= 0xFF  # one flipped byte inside the stored member: its CRC-32 no longer matches
    (tmp_path / "gzip.zip").write_bytes(bytes(blob))
    with pytest.raises(DataError) as err:
        read_dataset("emnist_mnist", str(tmp_path))
    assert "gzip.zip cannot be read" in _one_line(err) and "download it again" in str(err.value)
    _write_emnist(tmp_path / "d" / "gzip", "digits", [0, 12], [1])
    with pytest.raises(DataError) as err:
        read_dataset("emnist_digits", str(tmp_path / "d"))
    assert "labels span 0..12 for 10 classes" in _one_line(err)


# ----------------------------------------------------------------------------------------------------
# DomainNet


def _write_domainnet(root: Path, data_write_image, domains=("clipart", "sketch"), per_class: int = 2) -> Path:
    classes = ["aircraft_carrier", "zebra", "bee"]  # label order is the split files', not alphabetical
    for d, domain in enumerate(domains):
        for role in ("train", "test"):
            lines = []
            for label, cls in enumerate(classes):
                for i in range(per_class):
                    rel = f"{domain}/{cls}/{domain}_{role}_{label}_{i}.jpg"
                    data_write_image(root / rel, color=(40 * d, 80 * label, 10 * i), size=(6, 6))
                    lines.append(f"{rel} {label}")
            (root / f"{domain}_{role}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_domainnet_domains_labels_and_names(tmp_path, data_write_image):
    _write_domainnet(tmp_path / "domainnet", data_write_image)
    ds = read_dataset("domainnet", str(tmp_path))
    assert ds.class_names == ["aircraft_carrier", "zebra", "bee"] and ds.domain_names == ["clipart", "sketch"]
    assert ds.train.domains.tolist() == [0] * 6 + [1] * 6 and ds.train.targets.tolist() == [0, 0, 1, 1, 2, 2] * 2
    assert ds.test.paths[-1].endswith("sketch/bee/sketch_test_2_1.jpg")
    dil = build_scenario(DataConfig(dataset="domainnet", root=str(tmp_path), setting="dil", num_tasks=2, img_size=8),
                         seed=0)  # fmt: skip
    assert dil.domain_names == ["clipart", "sketch"]
    cil = build_scenario(DataConfig(dataset="domainnet", root=str(tmp_path), num_tasks=3, img_size=8), seed=0)
    assert cil.num_tasks == 3  # the class-split settings pool the domains


@pytest.mark.parametrize(
    "edit, phrase",
    [
        (lambda r: (r / "sketch_test.txt").write_text("sketch/zebra/x.jpg 0\n"),
         "label 0 is class 'zebra' here but 'aircraft_carrier' elsewhere"),
        (lambda r: (r / "sketch_train.txt").write_text("clipart/zebra/a.jpg 1\n"), "bad line"),
        (lambda r: (r / "clipart" / "bee" / "clipart_train_2_0.jpg").unlink(), "1 listed image(s) are missing"),
        (lambda r: shutil.rmtree(r / "sketch" / "zebra"), "4 listed image(s) are missing"),
        (lambda r: [(r / f"{d}_{s}.txt").unlink() for d in ("clipart", "sketch") for s in ("train", "test")],
         "DomainNet not found under"),
    ],
)  # fmt: skip
def test_domainnet_bad_files_are_one_line(tmp_path, data_write_image, edit, phrase):
    root = _write_domainnet(tmp_path, data_write_image)
    edit(root)
    with pytest.raises(DataError) as err:
        read_dataset("domainnet", str(root))
    assert phrase in _one_line(err)


def test_domainnet_repeated_lines_are_used_once_and_a_train_test_overlap_is_refused(tmp_path, data_write_image):
    root = _write_domainnet(tmp_path, data_write_image)
    train = root / "sketch_train.txt"
    first = train.read_text().splitlines()[0]
    train.write_text(train.read_text() + first + "\n")
    ds = read_dataset("domainnet", str(root))
    assert len(ds.train) == 12 and ds.notes == [f"DomainNet: sketch_train.txt lists 1 image(s) twice (e.g. "
                                                  f"{first.rsplit(' ', 1)[0]}); each is used once"]
    test = root / "sketch_test.txt"
    test.write_text(test.read_text() + first + "\n")  # a training image measured as a test image
    with pytest.raises(DataError) as err:
        read_dataset("domainnet", str(root))
    assert "1 image(s) are listed in both sketch_train.txt and sketch_test.txt" in _one_line(err)


def test_a_domainnet_dil_run_trains_one_task_per_domain(tmp_path, data_write_image, capsys):
    root = _write_domainnet(tmp_path / "dn", data_write_image, per_class=4)
    run = tmp_path / "run"
    argv = ["train", "tiny_l2p_pgp", "data.dataset=domainnet", f"data.root={root}", "data.setting=dil",
            "data.num_tasks=2", "train.progress=false", "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "complete" and len(results["acc"]["cil"]) == 2
    assert results["domain_names"] == ["clipart", "sketch"]


@pytest.mark.parametrize(
    "name, tv_class, fix",
    [("cifar10", "CIFAR10", "put cifar-10-python.tar.gz there by hand"),
     ("svhn", "SVHN", "put train_32x32.mat and test_32x32.mat there by hand"),
     ("kmnist", "KMNIST", "put the IDX .gz files there by hand"),
     ("emnist_letters", "EMNIST", "put gzip.zip there by hand")],
)  # fmt: skip
def test_a_failed_download_is_one_line(tmp_path, monkeypatch, name, tv_class, fix):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore detail")

    monkeypatch.setattr(torchvision.datasets, tv_class, offline)
    with pytest.raises(DataError) as err:
        read_dataset(name, str(tmp_path), download=True)
    assert "download into" in _one_line(err) and "name resolution" in str(err.value) and fix in str(err.value)


def test_domainnet_is_never_downloaded(tmp_path):
    with pytest.raises(DataError) as err:
        read_dataset("domainnet", str(tmp_path), download=True)
    assert "DomainNet cannot be downloaded by pgpcl: fetch it from http://ai.bu.edu/M3SDA/" in _one_line(err)


def test_a_run_over_two_datasets_trains_one_per_task(tmp_path, capsys):
    """As the 5-datasets benchmark does (CIFAR-10, MNIST, SVHN, ...): each task one dataset."""
    _write_cifar10(tmp_path / "c10")
    _write_svhn(tmp_path / "svhn", n_train=20, n_test=10)
    run = tmp_path / "run"
    argv = ["train", "tiny_l2p_pgp", f"data.datasets=[cifar10={tmp_path / 'c10'}, svhn={tmp_path / 'svhn'}]",
            "data.num_tasks=2", "data.train_per_class=null", "data.test_per_class=null", "train.progress=false",
            "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "complete" and results["task_classes"] == [[0, 1, 2], list(range(3, 13))]
    assert results["class_names"][:3] == ["airplane", "automobile", "bird"]
    assert results["acc"]["til"][0][1] is not None  # TIL is defined: the tasks' classes are disjoint
    capsys.readouterr()
    assert main(["report", str(run), "--no-plots"]) == 0
    assert "cifar10+svhn" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# notMNIST (as the 5-datasets benchmark reads it)


def _png(value: int, size=(28, 28)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


def _write_notmnist_zip(root: Path, per_class: int = 2, broken: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "notMNIST.zip", "w") as z:
        for split in ("Train", "Test"):
            for c, letter in enumerate("ABCDEFGHIJ"):
                for i in range(per_class):
                    z.writestr(f"notMNIST/{split}/{letter}/g{i}.png", _png(10 * c + i))
        if broken:  # the real archive holds a few PNGs that do not decode
            z.writestr("notMNIST/Train/F/Q3Jvc3NvdmVyIEJvbGRPYmxpcXVlLnR0Zg==.png", b"\x89PNG broken")
    return root


def test_notmnist_from_the_zip_or_its_folder_leaves_out_broken_glyphs(tmp_path):
    _write_notmnist_zip(tmp_path / "z")
    ds = read_dataset("notmnist", str(tmp_path / "z"))
    assert ds.class_names == list("ABCDEFGHIJ") and ds.train.images.shape == (20, 28, 28)
    assert ds.train.targets.tolist() == [c for c in range(10) for _ in range(2)] and len(ds.test) == 20
    assert ds.train.images[:, 0, 0].tolist() == [10 * c + i for c in range(10) for i in range(2)]
    assert len(ds.notes) == 1 and "left out 1 PNG(s)" in ds.notes[0] and "Q3Jvc3Nv" in ds.notes[0]
    with zipfile.ZipFile(tmp_path / "z" / "notMNIST.zip") as z:
        z.extractall(tmp_path / "x")
    folder = read_dataset("notmnist", str(tmp_path / "x"))
    assert np.array_equal(folder.train.images, ds.train.images) and folder.test.targets.tolist() == ds.test.targets.tolist()
    assert not read_dataset("notmnist", str(_write_notmnist_zip(tmp_path / "ok", broken=False))).notes


def test_notmnist_bad_or_missing_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        read_dataset("notmnist", str(tmp_path))
    assert "put notMNIST.zip" in _one_line(err) and "data.download=true" in str(err.value)
    root = tmp_path / "big"
    root.mkdir()
    with zipfile.ZipFile(root / "notMNIST.zip", "w") as z:
        z.writestr("notMNIST/Train/A/x.png", _png(1))
        z.writestr("notMNIST/Train/A/y.png", _png(1, (32, 32)))
        z.writestr("notMNIST/Test/A/x.png", _png(1))
    with pytest.raises(DataError) as err:
        read_dataset("notmnist", str(root))
    assert "notMNIST.zip:notMNIST/Train/A/y.png is 32x32, the glyphs before it 28x28" in _one_line(err)
    (root / "notMNIST.zip").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError) as err:
        read_dataset("notmnist", str(root))
    assert "notMNIST.zip cannot be read" in _one_line(err)
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(DataError) as err:
        read_dataset("notmnist", str(tmp_path / "none"), download=True)
    assert "notMNIST download into" in _one_line(err) and "put notMNIST.zip there by hand" in str(err.value)


def test_five_datasets_kind_of_run_notes_the_glyphs_it_left_out(tmp_path, data_write_idx, capsys):
    _write_notmnist_zip(tmp_path / "nm", per_class=3)
    digits = data_write_idx(tmp_path / "mnist", np.tile(np.arange(10), 3), np.arange(10))
    run = tmp_path / "run"
    argv = ["train", "tiny_l2p", f"data.datasets=[notmnist={tmp_path / 'nm'}, mnist={digits}]", "data.num_tasks=2",
            "data.train_per_class=null", "data.test_per_class=null", "train.progress=false", "--run-dir", str(run)]
    assert main(argv) == 0
    assert "pgpcl: note: notMNIST: left out 1 PNG(s)" in capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert results["class_names"][:10] == list("ABCDEFGHIJ") and results["status"] == "complete"
