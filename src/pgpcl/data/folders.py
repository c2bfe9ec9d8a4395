"""Datasets stored as image files: ImageNet-R, TinyImageNet, CUB-200-2011, DomainNet, notMNIST and a generic
image folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from pgpcl.data.base import (
    DATASETS,
    DatasetSplit,
    DatasetSplits,
    fetch,
    find_dir,
    find_or_fetch,
    list_images,
    read_lines,
    resolve_root,
    subdirs,
)
from pgpcl.errors import DataError

IMAGENET_R_SPLIT = "imagenet_r_v1.json"
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
CUB_URL = "https://data.caltech.edu/records/65de6-vp158"
_WNID = re.compile(r"^(n\d{8})\s+(.+)$")


def _no_download(name: str, url: str, root: Path) -> DataError:
    return DataError(f"{name} cannot be downloaded by pgpcl: fetch it from {url} and extract it under {root}")


def _split_of(paths: list[str], labels: list[int], is_test: np.ndarray) -> tuple[DatasetSplit, DatasetSplit]:
    arr = np.array(paths, dtype=object)
    y = np.asarray(labels, dtype=np.int64)
    train = DatasetSplit(images=None, paths=list(arr[~is_test]), targets=y[~is_test])
    test = DatasetSplit(images=None, paths=list(arr[is_test]), targets=y[is_test])
    return train, test


def _class_images(folder: Path) -> list[Path]:
    files = list_images(folder)
    if not files:
        raise DataError(f"class folder {folder} holds no images; remove it or re-extract the dataset")
    return files


# ----------------------------------------------------------------------------------------------------
# ImageNet-R


def load_split_spec(path: str | Path | None = None) -> dict:
    """The versioned ImageNet-R split: the shipped rule file, or a user file of the same schema."""
    try:
        if path is None:
            text = (resources.files("pgpcl.data") / "splits" / IMAGENET_R_SPLIT).read_text()
        else:
            text = Path(path).read_text()
        spec = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(
            f"ImageNet-R split file {path or IMAGENET_R_SPLIT} unreadable ({e}); fix or remove it"
        ) from None
    if "test" not in spec and not {"salt", "test_percent"} <= set(spec):
        raise DataError(
            f"ImageNet-R split file {path or IMAGENET_R_SPLIT} needs 'test' or 'salt'+'test_percent'"
        )
    return spec


def hash_percent(salt: str, rel_path: str) -> int:
    """Stable bucket 0..99 of one file: depends on nothing but its relative path."""
    digest = hashlib.sha256((salt + rel_path).encode("utf-8", "surrogateescape")).digest()  # any file name
    return int.from_bytes(digest[:8], "big") % 100


def imagenet_r_is_test(rel_paths: list[str], spec: dict) -> np.ndarray:
    """Boolean (N,) test mask for ``<wnid>/<file>`` paths under ``spec`` (explicit list, else hash rule)."""
    if "test" in spec:
        listed = set(spec["test"])
        missing = listed - set(rel_paths)
        if missing:
            raise DataError(
                f"ImageNet-R is incomplete: {len(missing)} files of the split list are missing "
                f"(e.g. {sorted(missing)[0]}); re-extract imagenet-r.tar"
            )
        return np.array([p in listed for p in rel_paths], dtype=bool)
    salt, pct = str(spec["salt"]), int(spec["test_percent"])
    return np.array([hash_percent(salt, p) < pct for p in rel_paths], dtype=bool)


def _wnid_names(folder: Path) -> dict[str, str]:
    """wnid -> readable name from the README.txt shipped in imagenet-r.tar, when present."""
    readme = folder / "README.txt"
    if not readme.is_file():
        return {}
    names = {}
    for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _WNID.match(line.strip())
        if m:
            names[m.group(1)] = m.group(2).strip()
    return names


@DATASETS.register("imagenet_r")
def read_imagenet_r(
    root: str | None, download: bool, *, split_file: str | Path | None = None
) -> DatasetSplits:
    """ImageNet-R: ``imagenet-r/<wnid>/*.jpg`` (200 classes), split 80/20 by the versioned rule file."""
    base = resolve_root(root)
    folder = base / "imagenet-r" if (base / "imagenet-r").is_dir() else base
    classes = subdirs(folder) if folder.is_dir() else []
    if not classes:
        if download:
            raise _no_download("ImageNet-R", IMAGENET_R_URL, base)
        raise DataError(
            f"ImageNet-R not found under {base}: extract imagenet-r.tar there (imagenet-r/<wnid>/*.jpg)"
        )
    rel, paths, labels = [], [], []
    for label, cdir in enumerate(classes):
        for f in _class_images(cdir):
            rel.append(f"{cdir.name}/{f.name}")
            paths.append(str(f))
            labels.append(label)
    is_test = imagenet_r_is_test(rel, load_split_spec(split_file))
    train, test = _split_of(paths, labels, is_test)
    readable = _wnid_names(folder)
    names = [readable.get(c.name, c.name) for c in classes]
    return DatasetSplits("imagenet_r", train, test, names)


# ----------------------------------------------------------------------------------------------------
# TinyImageNet


def _tiny_words(folder: Path, wnids: list[str]) -> list[str]:
    words = folder / "words.txt"
    table: dict[str, str] = {}
    if words.is_file():
        for line in read_lines(words, "TinyImageNet"):
            wnid, _, text = line.partition("\t")
            table[wnid] = text.split(",")[0].strip()
    return [table.get(w, w) for w in wnids]


def _tiny_val(folder: Path, label_of: dict[str, int]) -> tuple[list[str], list[int]]:
    """Val images and labels from ``val_annotations.txt``, which must list every val image exactly once."""
    ann = folder / "val" / "val_annotations.txt"
    labels_of_file: dict[str, int] = {}
    for line in read_lines(ann, "TinyImageNet"):
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(
                f"{ann}: bad line {line[:60]!r} (want file<TAB>wnid<TAB>box); re-extract the dataset"
            )
        if parts[1] not in label_of:
            raise DataError(f"{ann}: {parts[0]} has wnid {parts[1]!r}, not in wnids.txt; re-extract the dataset")
        if parts[0] in labels_of_file:
            raise DataError(f"{ann}: {parts[0]} is listed twice; re-extract the dataset")
        labels_of_file[parts[0]] = label_of[parts[1]]
    images = folder / "val" / "images"
    for name in labels_of_file:
        if not (images / name).is_file():
            raise DataError(f"TinyImageNet val image {images / name} is missing; re-extract tiny-imagenet-200.zip")
    unlisted = sorted({p.name for p in list_images(images)} - set(labels_of_file)) if images.is_dir() else []
    if unlisted:
        raise DataError(
            f"{ann} has no line for {len(unlisted)} val image(s) (e.g. {unlisted[0]}); re-extract the dataset"
        )
    return [str(images / n) for n in labels_of_file], list(labels_of_file.values())


@DATASETS.register("tiny_imagenet")
def read_tiny_imagenet(root: str | None, download: bool) -> DatasetSplits:
    """TinyImageNet: 200 classes (sorted wnids, as ImageFolder on train/), 100000 train / 10000 val=test."""
    base = resolve_root(root)
    folder = find_dir(base, "tiny-imagenet-200", "wnids.txt")
    if folder is None:
        if download:
            raise _no_download("TinyImageNet", TINY_IMAGENET_URL, base)
        raise DataError(f"TinyImageNet not found under {base}: extract tiny-imagenet-200.zip there")
    wnids = sorted(set(read_lines(folder / "wnids.txt", "TinyImageNet")))
    label_of = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for w in wnids:
        cdir = folder / "train" / w / "images"
        if not cdir.is_dir():
            raise DataError(f"TinyImageNet train folder {cdir} is missing; re-extract tiny-imagenet-200.zip")
        files = _class_images(cdir)
        paths += [str(f) for f in files]
        labels += [label_of[w]] * len(files)
    train = DatasetSplit(images=None, paths=paths, targets=np.asarray(labels, dtype=np.int64))
    vpaths, vlabels = _tiny_val(folder, label_of)
    test = DatasetSplit(images=None, paths=vpaths, targets=np.asarray(vlabels, dtype=np.int64))
    return DatasetSplits("tiny_imagenet", train, test, _tiny_words(folder, wnids))


# ----------------------------------------------------------------------------------------------------
# CUB-200-2011


def _id_table(path: Path) -> dict[int, str]:
    """``<id> <value>`` lines -> {id: value}."""
    table = {}
    for line in read_lines(path, "CUB-200-2011"):
        key, _, value = line.partition(" ")
        if not key.isdigit() or not value:
            raise DataError(
                f"{path}: bad line {line[:60]!r} (want '<id> <value>'); re-extract CUB_200_2011.tgz"
            )
        if int(key) in table:
            raise DataError(f"{path}: id {key} is listed twice; re-extract CUB_200_2011.tgz")
        table[int(key)] = value.strip()
    return table


def _cub_ints(table: dict[int, str], path: Path, allowed: set[int] | None = None) -> dict[int, int]:
    """The values of an id table as integers (class labels, or the 0/1 of train_test_split.txt)."""
    out = {}
    for key, value in table.items():
        if not value.isdigit() or (allowed is not None and int(value) not in allowed):
            want = "/".join(map(str, sorted(allowed))) if allowed else "an integer"
            raise DataError(f"{path}: id {key} has {value[:20]!r}, want {want}; re-extract CUB_200_2011.tgz")
        out[key] = int(value)
    return out


def _cub_name(raw: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    return raw.split(".", 1)[-1].replace("_", " ")


@DATASETS.register("cub200")
def read_cub200(root: str | None, download: bool) -> DatasetSplits:
    """CUB-200-2011: 200 bird classes, official train_test_split.txt (5994 train / 5794 test)."""
    base = resolve_root(root)
    folder = find_dir(base, "CUB_200_2011", "images.txt")
    if folder is None:
        if download:
            raise _no_download("CUB-200-2011", CUB_URL, base)
        raise DataError(f"CUB-200-2011 not found under {base}: extract CUB_200_2011.tgz there")
    images = _id_table(folder / "images.txt")
    labels = _cub_ints(_id_table(folder / "image_class_labels.txt"), folder / "image_class_labels.txt")
    split_file = folder / "train_test_split.txt"
    is_train = _cub_ints(_id_table(split_file), split_file, {0, 1})
    classes = _id_table(folder / "classes.txt")
    gap = next((k for k in range(1, len(classes) + 1) if k not in classes), None)
    if gap is not None:  # labels count classes from 1 with no gap: a gap would give later labels wrong names
        raise DataError(f"{folder / 'classes.txt'}: class ids are not 1..{len(classes)} (no id {gap}); "
                        "re-extract CUB_200_2011.tgz")
    ids = sorted(images)
    if set(labels) != set(ids) or set(is_train) != set(ids):
        raise DataError(
            f"{folder}: images.txt, image_class_labels.txt and train_test_split.txt list different ids"
        )
    paths = [str(folder / "images" / images[i]) for i in ids]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(
            f"CUB-200-2011: {len(missing)} image(s) listed in images.txt are missing (e.g. {missing[0]}); "
            "re-extract CUB_200_2011.tgz"
        )
    y = [labels[i] - 1 for i in ids]  # files count classes from 1
    test = np.array([is_train[i] == 0 for i in ids], dtype=bool)
    train_split, test_split = _split_of(paths, y, test)
    names = [_cub_name(classes[k]) for k in sorted(classes)]
    return DatasetSplits("cub200", train_split, test_split, names)


# ----------------------------------------------------------------------------------------------------
# DomainNet

DOMAINNET_URL = "http://ai.bu.edu/M3SDA/"
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def _domainnet_folder(base: Path) -> tuple[Path, list[str]] | None:
    """The folder holding ``<domain>_{train,test}.txt`` and the domains whose two split files are there."""
    for cand in (base / "domainnet", base / "DomainNet", base):
        found = [d for d in DOMAINNET_DOMAINS if all((cand / f"{d}_{r}.txt").is_file() for r in ("train", "test"))]
        if found:
            return cand, found
    return None


def _domainnet_list(path: Path, domain: str, class_of: dict[int, str]) -> tuple[list[str], list[int]]:
    """``<domain>/<class>/<file> <label>`` lines; every label must name the same class folder everywhere."""
    rels, labels = [], []
    for line in read_lines(path, "DomainNet"):
        rel, _, label = line.rpartition(" ")
        parts = rel.split("/")
        if not label.isdigit() or len(parts) != 3 or parts[0] != domain:
            raise DataError(f"{path}: bad line {line[:80]!r} (want '{domain}/<class>/<file> <label>'); "
                            "download the split file again")
        held = class_of.setdefault(int(label), parts[1])
        if held != parts[1]:
            raise DataError(f"{path}: label {label} is class {parts[1]!r} here but {held!r} elsewhere; "
                            "use the split files of one DomainNet release")
        rels.append(rel)
        labels.append(int(label))
    if not rels:
        raise DataError(f"{path} lists no images; download the split file again")
    return rels, labels


def _unique_lines(rels: list[str], labels: list[int]) -> tuple[list[str], list[int], list[str]]:
    """``rels`` and ``labels`` with each path once (its first line), and the paths that were repeated."""
    first: dict[str, int] = {}
    repeats = []
    for i, rel in enumerate(rels):
        if rel in first:
            repeats.append(rel)
        else:
            first[rel] = i
    kept = list(first.values())
    return [rels[i] for i in kept], [labels[i] for i in kept], repeats


def _not_on_disk(paths: list[str]) -> list[str]:
    """The ``paths`` that are not files, found with one listing per folder instead of one stat per file
    (DomainNet lists ~600k images in ~2k folders; on a network file system the stats would take minutes)."""
    by_folder: dict[str, list[str]] = {}
    for p in paths:
        folder, _, name = p.rpartition(os.sep)
        by_folder.setdefault(folder, []).append(name)
    missing = []
    for folder, names in by_folder.items():
        try:
            present = {e.name for e in os.scandir(folder) if e.is_file()}
        except OSError:  # no such folder, or not one
            present = set()
        missing += [f"{folder}{os.sep}{n}" for n in names if n not in present]
    return missing


@DATASETS.register("domainnet")
def read_domainnet(root: str | None, download: bool) -> DatasetSplits:
    """DomainNet: ``<domain>/<class>/*.jpg`` with the official ``<domain>_{train,test}.txt`` split files, for
    every domain whose two split files are present (345 classes; domains in the official order).

    Each image carries its domain: ``data.setting=dil`` makes one task per domain, the class-split settings
    pool the domains.
    """
    base = resolve_root(root)
    located = _domainnet_folder(base)
    if located is None:
        if download:
            raise _no_download("DomainNet", DOMAINNET_URL, base)
        raise DataError(f"DomainNet not found under {base}: extract the domains' zips there and put each domain's "
                        "<domain>_train.txt and <domain>_test.txt beside them")
    folder, domains = located
    class_of: dict[int, str] = {}
    parts: dict[str, tuple[list[str], list[int], list[int]]] = {"train": ([], [], []), "test": ([], [], [])}
    notes = []
    for k, domain in enumerate(domains):
        listed = {}
        for role, (paths, labels, doms) in parts.items():
            rels, ys, repeats = _unique_lines(*_domainnet_list(folder / f"{domain}_{role}.txt", domain, class_of))
            if repeats:
                notes.append(f"DomainNet: {domain}_{role}.txt lists {len(repeats)} image(s) twice (e.g. {repeats[0]}); "
                             "each is used once")
            listed[role] = set(rels)
            paths += [str(folder / r) for r in rels]
            labels += ys
            doms += [k] * len(rels)
        both = sorted(listed["train"] & listed["test"])
        if both:  # a test image trained on: its accuracy would be measured on seen data
            raise DataError(f"DomainNet: {len(both)} image(s) are listed in both {domain}_train.txt and "
                            f"{domain}_test.txt (e.g. {both[0]}); use the split files of one DomainNet release")
    if sorted(class_of) != list(range(len(class_of))):
        gap = min(set(range(max(class_of) + 1)) - set(class_of))
        raise DataError(f"DomainNet: no split file lists label {gap}; use complete split files")
    missing = _not_on_disk([p for paths, _, _ in parts.values() for p in paths])
    if missing:
        raise DataError(f"DomainNet: {len(missing)} listed image(s) are missing (e.g. {missing[0]}); "
                        "re-extract that domain's zip")
    splits = {
        role: DatasetSplit(images=None, paths=p, targets=np.asarray(y, dtype=np.int64),
                           domains=np.asarray(d, dtype=np.int64))
        for role, (p, y, d) in parts.items()
    }
    names = [class_of[i] for i in range(len(class_of))]
    return DatasetSplits("domainnet", splits["train"], splits["test"], names, list(domains), notes=notes)


# ----------------------------------------------------------------------------------------------------
# Generic folders


def _folder_layout(root: Path) -> list[tuple[str | None, Path]]:
    """[(domain name or None, folder holding train/ and test/)] for the flat or the per-domain layout."""
    if (root / "train").is_dir():
        return [(None, root)]
    domains = [(d.name, d) for d in subdirs(root) if (d / "train").is_dir()]
    if not domains:
        raise DataError(
            f"image_folder: {root} has no train/ folder; use root/{{train,test}}/<class>/ or "
            "root/<domain>/{train,test}/<class>/"
        )
    return domains


def _collect(folder: Path, label_of: dict[str, int], domain: int) -> tuple[list[str], list[int], list[int]]:
    paths, labels = [], []
    if not folder.is_dir():
        raise DataError(f"image_folder: {folder} is missing; every train/ folder needs a test/ next to it")
    for cdir in subdirs(folder):
        if cdir.name not in label_of:
            raise DataError(
                f"image_folder: class {cdir.name!r} in {folder} has no train/ folder; add or remove it"
            )
        files = _class_images(cdir)
        paths += [str(f) for f in files]
        labels += [label_of[cdir.name]] * len(files)
    return paths, labels, [domain] * len(paths)


def _same_classes(layout: list[tuple[str | None, Path]]) -> None:
    """DIL needs every domain to hold the same classes: one head is shared across domains."""
    sets = {name: sorted(c.name for c in subdirs(d / "train")) for name, d in layout}
    first, *rest = sets
    for name in rest:
        if sets[name] != sets[first]:
            odd = sorted(set(sets[name]) ^ set(sets[first]))
            raise DataError(
                f"image_folder: domains {first!r} and {name!r} hold different classes (e.g. {odd[0]!r}); "
                "give every domain's train/ the same class folders"
            )


def _is_link_loop(path: Path) -> bool:
    import errno

    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


@DATASETS.register("image_folder")
def read_image_folder(root: str | None, download: bool) -> DatasetSplits:
    """``root/{train,test}/<class>/*`` or, for DIL, ``root/<domain>/{train,test}/<class>/*``.

    Classes are the sorted union of train class folder names; domains are sorted folder names.
    """
    if not root:
        raise DataError(
            "image_folder needs data.root: set it to a folder with train/<class>/ and test/<class>/"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        what = ("is a file, not a folder" if base.is_file()
                else "is a loop of symbolic links" if _is_link_loop(base) else "does not exist")
        raise DataError(f"image_folder: {base} {what}; set data.root to your image folder")
    layout = _folder_layout(base)
    if layout[0][0] is not None:
        _same_classes(layout)
    names = sorted({c.name for _, d in layout for c in subdirs(d / "train")})
    label_of = {n: i for i, n in enumerate(names)}
    parts = {"train": ([], [], []), "test": ([], [], [])}
    for k, (_, d) in enumerate(layout):
        for role, acc in parts.items():
            for lst, new in zip(acc, _collect(d / role, label_of, k)):
                lst += new
    domain_names = [n for n, _ in layout] if layout[0][0] is not None else None
    splits = {
        role: DatasetSplit(
            images=None,
            paths=p,
            targets=np.asarray(y, dtype=np.int64),
            domains=np.asarray(dm, dtype=np.int64) if domain_names else None,
        )
        for role, (p, y, dm) in parts.items()
    }
    return DatasetSplits("image_folder", splits["train"], splits["test"], names, domain_names)


# ----------------------------------------------------------------------------------------------------
# notMNIST, as the 5-datasets benchmark reads it

NOTMNIST_ZIP = "notMNIST.zip"
NOTMNIST_URL = "https://github.com/facebookresearch/Adversarial-Continual-Learning/raw/main/data/notMNIST.zip"
NOTMNIST_CLASSES = list("ABCDEFGHIJ")
_NOTMNIST_SPLITS = {"train": "Train", "test": "Test"}


def _glyph(raw: bytes, name: str) -> np.ndarray | None:
    """uint8 (H, W) of one PNG, or None if it does not decode (the archive holds a few broken ones)."""
    from PIL import Image, UnidentifiedImageError

    from pgpcl.data.taskset import eight_bit

    try:
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(eight_bit(im).convert("L"), dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise DataError(f"notMNIST: {name} is too large to decode safely ({e}); it is not a glyph") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None


def _notmnist_members(base: Path) -> dict[str, list[tuple[str, int, bytes]]] | None:
    """Per split, (name, label, bytes) of every glyph file: from ``notMNIST/{Train,Test}/<letter>/`` on
    disk, else straight from ``notMNIST.zip``; None if neither is there."""
    for folder in (base / "notMNIST", base):
        if all((folder / d).is_dir() for d in _NOTMNIST_SPLITS.values()):
            return {
                role: [(str(f), k, f.read_bytes()) for k, c in enumerate(NOTMNIST_CLASSES) if (folder / d / c).is_dir()
                       for f in list_images(folder / d / c)]
                for role, d in _NOTMNIST_SPLITS.items()
            }  # fmt: skip
    archive = base / NOTMNIST_ZIP
    if not archive.is_file():
        return None
    out: dict[str, list[tuple[str, int, bytes]]] = {role: [] for role in _NOTMNIST_SPLITS}
    try:
        with zipfile.ZipFile(archive) as z:
            for n in sorted(n for n in z.namelist() if n.lower().endswith(".png")):
                parts = n.split("/")
                role = next((r for r, d in _NOTMNIST_SPLITS.items() if len(parts) >= 3 and parts[-3] == d), None)
                if role is not None and parts[-2] in NOTMNIST_CLASSES:
                    # read() checks the member's CRC-32
                    out[role].append((f"{archive}:{n}", NOTMNIST_CLASSES.index(parts[-2]), z.read(n)))
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive} cannot be read ({e}); delete it and download it again") from None
    return out


def _download_notmnist(base: Path) -> None:
    def torchvision_download() -> None:
        from torchvision.datasets.utils import download_url

        download_url(NOTMNIST_URL, str(base), NOTMNIST_ZIP)

    fetch("notMNIST", base, NOTMNIST_ZIP, torchvision_download, where=f" ({NOTMNIST_URL})")


@DATASETS.register("notmnist")
def read_notmnist(root: str | None, download: bool) -> DatasetSplits:
    """notMNIST as the 5-datasets benchmark reads it: ``notMNIST.zip`` (from Adversarial Continual Learning)
    with ``notMNIST/{Train,Test}/<A..J>/*.png``, read from the zip or from its extracted folder; glyphs
    decoded into memory (gray, 28x28 in that archive), classes A..J. A PNG that does not decode is left out, as the
    benchmark's loaders do, and the run says how many."""
    base = resolve_root(root)
    members = find_or_fetch(lambda: _notmnist_members(base), lambda: _download_notmnist(base), download)
    if members is None:
        raise DataError(f"notMNIST not found under {base}: put {NOTMNIST_ZIP} ({NOTMNIST_URL}) or its extracted "
                        "notMNIST/Train and notMNIST/Test there, or set data.download=true")
    splits, skipped = {}, []
    for role, files in members.items():
        images, labels = [], []
        for name, label, raw in files:
            glyph = _glyph(raw, name)
            if glyph is None:
                skipped.append(name)
                continue
            if images and glyph.shape != images[0].shape:
                raise DataError(f"notMNIST: {name} is {glyph.shape[1]}x{glyph.shape[0]}, the glyphs before it "
                                f"{images[0].shape[1]}x{images[0].shape[0]}; this is not the 5-datasets notMNIST "
                                f"({NOTMNIST_ZIP}), fetch that one")
            images.append(glyph)
            labels.append(label)
        if not images:
            raise DataError(f"notMNIST: the {_NOTMNIST_SPLITS[role]} split holds no readable glyphs under {base}; "
                            f"re-extract {NOTMNIST_ZIP}")
        splits[role] = DatasetSplit(images=np.stack(images), paths=None, targets=np.asarray(labels, dtype=np.int64))
    notes = [f"notMNIST: left out {len(skipped)} PNG(s) that do not decode (e.g. {skipped[0]}), as the 5-datasets "
             "benchmark does"] if skipped else []
    return DatasetSplits("notmnist", splits["train"], splits["test"], list(NOTMNIST_CLASSES), notes=notes)
