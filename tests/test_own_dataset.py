"""A dataset of one's own (docs/ARCHITECTURE.md, "Data"): a reader in a user module, listed under
``imports``, trains like a built-in one; a reader that breaks the contract is refused in one line that
names the dataset and what to return instead."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from pgpcl.cli import main
from pgpcl.data import DATASETS
from pgpcl.data.base import DatasetSplit, DatasetSplits, read_dataset
from pgpcl.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("data_one_thread")

SMALL = ["train.progress=false", "train.max_steps_per_task=2", "data.train_per_class=8", "data.test_per_class=4"]


def arrays(n: int = 60, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 12, 12), dtype=np.uint8), np.arange(n) % classes


def splits(**change) -> DatasetSplits:
    x, y = arrays()
    parts = {"train": DatasetSplit(x, None, y), "test": DatasetSplit(x[:20], None, y[:20]),
             "class_names": [f"c{i}" for i in range(10)]}
    parts.update(change)
    return DatasetSplits("mine", parts["train"], parts["test"], parts["class_names"], parts.get("domain_names"))


@pytest.fixture
def register():
    """Register readers for one test; they are gone afterwards."""
    added = []

    def add(name, reader):
        DATASETS.register(name)(reader)
        added.append(name)

    yield add
    for name in added:
        DATASETS._items.pop(name, None)


MODULE = '''
import numpy as np
from pgpcl.data import DATASETS
from pgpcl.data.base import DatasetSplit, DatasetSplits

@DATASETS.register("lab_digits")
def read_lab_digits(root, download):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 12, 12), dtype=np.uint8)
    y = np.arange(200) % 10
    x[np.arange(200), y, y] = 255  # a bright pixel where the class says: learnable
    return DatasetSplits("lab_digits", DatasetSplit(x[:150], None, y[:150]), DatasetSplit(x[150:], None, y[150:]),
                         [str(i) for i in range(10)])
'''


def test_an_own_reader_trains_from_the_command_line_and_reevaluates(tmp_path, monkeypatch, capsys):
    (tmp_path / "lab_data.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    try:
        assert main(["train", "tiny_l2p_pgp", *SMALL, "imports=[lab_data]", "data.dataset=lab_digits",
                     "--run-dir", str(run)]) == 0
        results = json.loads((run / "results.json").read_text())
        assert results["status"] == "complete" and results["config"]["data"]["dataset"] == "lab_digits"
        capsys.readouterr()
        assert main(["eval", str(run)]) == 0  # imports come from the run's config.yaml
        assert f"{results['metrics']['cil']['final_acc']:.2f}" in capsys.readouterr().out
    finally:
        DATASETS._items.pop("lab_digits", None)
        sys.modules.pop("lab_data", None)


def test_an_unknown_dataset_points_at_imports(tmp_path, capsys):
    assert main(["train", "tiny_l2p", "data.dataset=lab_digitz", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'lab_digitz'" in err and "for a dataset of your own, list its module under imports" in err


BROKEN = [  # (what the reader returns, the words of the one-line refusal)
    (lambda: splits(train=DatasetSplit(arrays()[0], None, arrays()[1] + 0.7)), "targets must be whole numbers, got 0.7"),
    (lambda: splits(train=DatasetSplit(arrays()[0].astype(np.float32) / 255, None, arrays()[1])),
     "images must be uint8 0..255, got float32"),
    (lambda: splits(train=DatasetSplit(np.zeros((60, 3, 12, 12), np.uint8), None, arrays()[1])),
     "images.transpose(0, 2, 3, 1)"),
    (lambda: splits(train=DatasetSplit(np.zeros((60, 12, 12, 4), np.uint8), None, arrays()[1])), "drop alpha"),
    (lambda: splits(train=DatasetSplit(arrays()[0], None, arrays()[1][:59])), "60 images but 59 targets"),
    (lambda: splits(train=DatasetSplit(arrays()[0], None, arrays()[1].astype(str))), "targets must be integers"),
    (lambda: splits(class_names=list(range(10))), "class_names must be a list of strings"),
    (lambda: splits(class_names=[f"c{i}" for i in range(8)]), "labels span 0..9 but there are 8 class names"),
    (lambda: splits(train=DatasetSplit(arrays()[0], None, arrays()[1], np.arange(60) % 2)),
     "only the train split has domain labels"),
    (lambda: splits(train=DatasetSplit(arrays()[0], None, arrays()[1], (np.arange(60) % 2) * 2),
                    test=DatasetSplit(arrays()[0][:20], None, arrays()[1][:20], (np.arange(20) % 2) * 2)),
     "train domain labels are [0, 2] for domains up to 2; number the domains 0..K-1"),
    (lambda: splits(train=DatasetSplit(arrays()[0], None, arrays()[1], np.arange(60) % 2),
                    test=DatasetSplit(arrays()[0][:20], None, arrays()[1][:20], np.arange(20) % 2),
                    domain_names=["a", "b", "c"]),
     "train domain labels are [0, 1] for 3 domain names"),
    (lambda: None, "the reader of dataset 'mine' returned NoneType, not DatasetSplits"),
]


def test_a_class_without_test_images_is_refused(register, tmp_path):
    from pgpcl.config import load_config
    from pgpcl.data import build_scenario

    x, y = arrays()
    keep = y[:20] != 9  # the test split lacks class 9 entirely
    register("mine", lambda root, download: splits(test=DatasetSplit(x[:20][keep], None, y[:20][keep])))
    cfg = load_config("tiny_l2p", ["data.dataset=mine"])
    with pytest.raises(DataError, match=r"mine: 1 of 10 classes have no test images \(e.g. 'c9'\); the dataset is "
                                        "incomplete"):
        build_scenario(cfg.data, 0)


@pytest.mark.parametrize(("made", "words"), BROKEN)
def test_a_reader_breaking_the_contract_is_one_line(register, made, words):
    register("mine", lambda root, download: made())
    with pytest.raises(DataError) as e:
        read_dataset("mine", None)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_same_through_the_command_line_exits_2(register, tmp_path, capsys):
    register("mine", lambda root, download: splits(train=DatasetSplit(arrays()[0], None, arrays()[1] + 0.5)))
    assert main(["train", "tiny_l2p", "data.dataset=mine", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("pgpcl: error: dataset 'mine' broke the reader contract: targets must be whole numbers, got 0.5; "
                   "give integer labels")
    assert not (tmp_path / "r").exists()


def test_whole_float_labels_and_torch_images_are_taken(register):
    x, y = arrays()
    register("mine", lambda root, download: splits(train=DatasetSplit(torch.from_numpy(x), None, y.astype(float))))
    data = read_dataset("mine", None)
    assert data.train.targets.dtype == np.int64 and data.train.targets.tolist() == y.tolist()
    assert isinstance(data.train.images, np.ndarray)


def test_a_reader_whose_files_are_missing_is_one_line(register, tmp_path):
    def reader(root, download):
        return open(tmp_path / "nope" / "labels.txt")  # noqa: SIM115  (fails: the file is not there)

    register("mine", reader)
    with pytest.raises(DataError, match=r"^dataset 'mine': .*labels.txt.*; check data.root$"):
        read_dataset("mine", None)


def test_registering_again_replaces_the_same_definition_and_refuses_another(register):
    def read_mine(root, download):
        return splits()

    register("mine", read_mine)

    def read_mine(root, download):  # noqa: F811  (a notebook cell run again)
        return splits()

    DATASETS.register("mine")(read_mine)
    assert DATASETS.get("mine") is read_mine

    def other(root, download):
        return splits()

    with pytest.raises(ConfigError, match=r"dataset 'mine' is registered twice \(.*read_mine and .*other\)"):
        DATASETS.register("mine")(other)


def test_an_import_whose_dependency_is_missing_says_so(tmp_path, monkeypatch):
    from pgpcl.config import import_modules

    (tmp_path / "needs_more.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"'needs_more' was found but importing it failed .*not_installed_anywhere"):
        import_modules(["needs_more"])
    with pytest.raises(ConfigError, match=r"cannot import 'not_a_module_here' .* put its folder on PYTHONPATH"):
        import_modules(["not_a_module_here"])


def test_changed_pixels_under_the_same_counts_are_caught_on_eval(register, tmp_path, capsys):
    seed = {"value": 0}
    register("mine", lambda root, download: splits(train=DatasetSplit(arrays(seed=seed["value"])[0], None, arrays()[1])))
    run = tmp_path / "run"
    assert main(["train", "tiny_l2p", *SMALL, "data.dataset=mine", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0  # the same data: re-evaluated
    seed["value"] = 7  # the reader now returns other pixels, same shapes and labels
    assert main(["eval", str(run)]) == 2
    assert "content digest differs" in capsys.readouterr().err



def _folder_reader(root, download):
    """Files straight under data.root: ROOT/<class>/<n>.png (ImageNet-R's depth)."""
    from pathlib import Path

    paths = sorted(Path(root).glob("*/*.png"))
    labels = [int(p.parent.name[1:]) for p in paths]
    test = [i for i, p in enumerate(paths) if p.stem.startswith("t")]
    train = [i for i in range(len(paths)) if i not in test]
    pick = lambda rows: DatasetSplit(None, [str(paths[i]) for i in rows], [labels[i] for i in rows])  # noqa: E731
    return DatasetSplits("mine", pick(train), pick(test), [f"c{i}" for i in range(4)])


def test_a_moved_data_folder_still_evaluates(register, tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "flowers"
    for c in range(4):
        (data / f"c{c}").mkdir(parents=True)
        for name in ("0", "1", "2", "t0"):
            Image.new("RGB", (12, 12), (60 * c, 30 * len(name), 9)).save(data / f"c{c}" / f"{name}.png")
    register("mine", _folder_reader)
    run = tmp_path / "run"
    assert main(["train", "tiny_l2p", *SMALL, "data.dataset=mine", f"data.root={data}", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    first = capsys.readouterr().out.splitlines()[1:]
    moved = data.rename(tmp_path / "flowers_copy")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(data), str(moved)))
    assert main(["eval", str(run)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.splitlines()[1:] == first


def test_class_names_as_a_numpy_array_are_taken(register):
    register("mine", lambda root, download: splits(class_names=np.array([f"c{i}" for i in range(10)])))
    data = read_dataset("mine", None)
    assert data.class_names == [f"c{i}" for i in range(10)] and type(data.class_names[0]) is str


def test_pgpcl_datasets_lists_every_reader_and_ones_own(tmp_path, monkeypatch, capsys):
    from pgpcl.data import DATASETS as registry

    (tmp_path / "lab_data.py").write_text(textwrap.dedent(MODULE.replace("def read_lab_digits(root, download):",
                                                                          'def read_lab_digits(root, download):\n'
                                                                          '    """Lab digits: 12x12 synthetic. More."""')))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["datasets"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == registry.names() and "lab_digits" not in registry.names()
        cifar10 = next(line for line in lines if line.startswith("cifar10 "))
        assert "CIFAR-10: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}" in cifar10
        assert main(["datasets", "--imports", "lab_data"]) == 0
        assert any(line.split(None, 1) == ["lab_digits", "Lab digits: 12x12 synthetic"]
                   for line in capsys.readouterr().out.splitlines())
        assert main(["datasets", "--imports", "no_such_lab"]) == 2
        assert "imports: cannot import 'no_such_lab'" in capsys.readouterr().err
    finally:
        DATASETS._items.pop("lab_digits", None)
        sys.modules.pop("lab_data", None)
