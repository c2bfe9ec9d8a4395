"""pgpcl used from Python: a Config built or changed by hand gets the checks a YAML file gets, before
anything is written, and a resumed run trains what its folder says."""

from __future__ import annotations

import json
import re

import pytest

from pgpcl.config import Config, checked_config, load_config
from pgpcl.engine.trainer import resume_config, train
from pgpcl.errors import ConfigError
from pgpcl.methods import METHODS

SMALL = ["train.progress=false", "data.train_per_class=16", "data.test_per_class=8"]

CHANGES = [  # (what a user sets in Python, the message)
    (lambda c: setattr(c.train, "epochs", "two"), "config key 'train.epochs' must be an integer, got 'two'"),
    (lambda c: setattr(c.train, "lr", "0.1"), "config key 'train.lr' must be a number, got '0.1'"),
    (lambda c: setattr(c.train, "epochs", 0), "train.epochs must be >= 1, got 0"),
    (lambda c: setattr(c.method.params, "top_k", 9), "method.top_k (9) is larger than method.pool_size (4)"),
    (lambda c: setattr(c.train, "epoch", 3), "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
    (lambda c: setattr(c.method, "name", "dualprompt"),
     "method.params is a L2P.Params but method.name is 'dualprompt'"),
]


@pytest.mark.parametrize(("change", "message"), CHANGES)
def test_train_checks_a_config_changed_in_python_before_writing(tmp_path, change, message):
    cfg = load_config("tiny_l2p", SMALL)
    change(cfg)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_valid_config_is_unchanged_by_the_check():
    cfg = load_config("tiny_dualprompt_pgp", SMALL + ["pgp.eps.g_key=0.9"])
    assert checked_config(cfg).to_dict() == cfg.to_dict()


def test_params_none_means_the_methods_defaults():
    cfg = Config()
    cfg.method.name = "coda_prompt"
    assert checked_config(cfg).method.params == METHODS.get("coda_prompt").Params()


def test_overrides_given_as_one_string_are_refused():
    with pytest.raises(ConfigError, match=r"overrides must be a list .* write \['train.epochs=2'\]"):
        load_config("tiny_l2p", "train.epochs=2")


def test_resuming_with_another_config_is_refused_and_resume_config_works(tmp_path):
    run = tmp_path / "run"
    cfg = load_config("tiny_l2p", SMALL + ["train.max_steps_per_task=2"])
    train(cfg, run)
    before = (run / "results.json").read_bytes()
    cfg.train.lr = 0.5
    with pytest.raises(ConfigError, match=r"differs from its config.yaml in train.lr \(the run has 0.05, the "
                                          r"config gives 0.5\); resume with resume_config"):
        train(cfg, run, resume=True)
    assert (run / "results.json").read_bytes() == before
    results = train(resume_config(run, ["train.num_threads=1"]), run, resume=True)  # finished: nothing to do
    assert results.status == "complete" and json.loads(before)["status"] == "complete"
    assert (run / "results.json").read_bytes() == before  # not rewritten, no "resumes" entry added


def test_reevaluate_run_gives_the_recorded_numbers(tmp_path):
    from pgpcl.engine.evaluate import reevaluate_run

    run = tmp_path / "run"
    results = train(load_config("tiny_l2p", SMALL + ["train.max_steps_per_task=2"]), run)
    ev = reevaluate_run(run)
    assert ev["after_task"] == 1 and ev["num_tasks"] == 2
    for setting in ("cil", "til"):
        assert ev[setting] == pytest.approx([row[-1] for row in results.acc[setting]], abs=1e-9)


def test_numpy_numbers_and_paths_set_in_python_are_taken(tmp_path):
    np = pytest.importorskip("numpy")
    cfg = load_config("tiny_l2p", SMALL)
    cfg.seed, cfg.train.lr, cfg.output_dir = np.int64(3), np.float32(0.5), tmp_path / "runs"
    checked = checked_config(cfg)
    assert (checked.seed, checked.train.lr, checked.output_dir) == (3, 0.5, str(tmp_path / "runs"))
    assert type(checked.seed) is int and type(checked.train.lr) is float
