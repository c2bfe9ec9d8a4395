import pytest
import torch

from pgpcl.config import apply_overrides, config_from_dict, list_presets, load_config, load_raw
from pgpcl.errors import ConfigError

RELEASED = ["cifar100_10", "cifar100_20", "imagenet_r_10", "tiny_imagenet_10", "cub200_5"]


def test_every_preset_loads():
    names = list_presets()
    for bench in RELEASED:
        for method in ("l2p", "dualprompt"):
            assert f"{bench}_{method}" in names
            assert f"{bench}_{method}_pgp" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_released_hyperparameters():
    c = load_config("imagenet_r_10_l2p")
    assert (c.method.params.length, c.method.params.top_k, c.method.params.pool_size) == (30, 1, 10)
    assert (c.train.epochs, c.train.lr, c.train.batch_size, c.seed) == (50, 0.005, 16, 59)
    d = load_config("cifar100_10_dualprompt")
    assert (d.train.epochs, d.train.batch_size, d.seed, d.method.params.pull_lambda) == (20, 24, 59, 1.0)
    assert d.backbone.pretrained_tag == "orig_in21k"  # the released code's imagenet21k/ViT-B_16.npz
    assert not load_config("imagenet_r_10_dualprompt").method.params.batchwise_prompt


def test_coda_prompt_presets_follow_its_own_protocol():
    c = load_config("cifar100_10_coda_prompt")
    p = c.method.params
    assert (p.pool_size, p.length, p.layers, p.ortho_mu) == (100, 4, [0, 1, 2, 3, 4], 0.1)
    assert (c.train.epochs, c.train.lr, c.train.batch_size, c.train.scheduler) == (20, 0.001, 128, "cosine")
    assert not c.train.lr_scale_by_batch and c.train.clip_grad is None
    assert (c.data.class_order, c.data.train_transform, c.data.test_transform) == ("random", "clip", "plain")
    assert c.backbone.pretrained_tag == "augreg_in21k_ft_in1k"
    r = load_config("imagenet_r_10_coda_prompt")
    assert (r.data.dataset, r.train.epochs) == ("imagenet_r", 50)


def test_clip_presets_past_cifar100_10_carry_its_settings_over():
    """No released CLIP setup exists beyond 10-split CIFAR-100: these presets take its settings as they
    are, with CLIP's input normalisation for the datasets that are not CIFAR-100."""
    base = load_config("cifar100_10_clip")
    for name, dataset, tasks, normalize in (("cifar100_20_clip", "cifar100", 20, "cifar100"),
                                            ("imagenet_r_10_clip", "imagenet_r", 10, "clip"),
                                            ("tiny_imagenet_10_clip", "tiny_imagenet", 10, "clip"),
                                            ("cub200_5_clip", "cub200", 5, "clip")):
        c = load_config(name)
        assert (c.data.dataset, c.data.num_tasks, c.data.normalize) == (dataset, tasks, normalize), name
        assert (c.train, c.method, c.backbone, c.seed) == (base.train, base.method, base.backbone, base.seed), name
        assert (c.data.train_transform, c.data.test_transform) == (base.data.train_transform, base.data.test_transform)


def test_every_pgp_preset_differs_from_its_baseline_only_in_pgp():
    names = set(list_presets())
    pairs = [(n[: -len("_pgp")], n) for n in sorted(names) if n.endswith("_pgp")]
    assert len(pairs) >= 16 and all(base in names for base, _ in pairs)
    for base_name, pgp_name in pairs:
        base, pgp = load_config(base_name).to_dict(), load_config(pgp_name).to_dict()
        assert pgp["pgp"]["enabled"] and not base["pgp"]["enabled"], pgp_name
        for key in ("data", "backbone", "method", "train", "seed"):
            assert base[key] == pgp[key], (pgp_name, key)


def test_overrides_are_typed():
    cfg = load_config("tiny_l2p", ["train.lr=0.5", "method.top_k=1", "pgp.eps={key: 0.9}", "data.root=/x"])
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.method.params.top_k == 1
    assert cfg.pgp.eps == {"key": 0.9}
    assert cfg.data.root == "/x"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.num_task=3", "did you mean 'data.num_tasks'"),
        ("method.pool_sz=3", "did you mean 'method.pool_size'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("train.lr=fast", "must be a number"),
        ("train.epochs=1.5", "must be an integer"),
        ("data.setting=cli", "did you mean 'cil'"),
        ("pgp.eps={key: 1.5}", "pgp.eps.key must be in (0, 1]"),
        ("method.top_k=9", "larger than method.pool_size"),
        ("pgp.enabled=maybe", "must be true or false"),
        ("method.name=l3p", "did you mean 'l2p'"),
        ("name=on", "quote the text: name=\"'...'\""),
        ("output_dir=2024", "got 2024 (YAML reads"),
        # values torch's optimizers or timm would only refuse mid-run, after the run folder was prepared
        ("train.betas=[0.9]", "train.betas must be two numbers in [0, 1)"),
        ("train.betas=[0.9, 1.5]", "train.betas must be two numbers in [0, 1)"),
        ("train.weight_decay=-1", "train.weight_decay must be a finite number >= 0"),
        ("train.momentum=-1", "train.momentum must be in [0, 1)"),
        ("backbone.depth=0", "backbone.depth must be >= 1"),
        ("seed=-1", "seed must be in 0..4294967295"),
        ("seed=99999999999999999999", "seed must be in 0..4294967295"),
        ("data.order_seed=-5", "data.order_seed must be in 0..4294967295"),
        ("train.device=mps", "train.device must be auto, cpu, cuda or cuda:N"),
        ("data.channels=3", "data.channels=3 but backbone.in_chans=1"),
        ("data.img_size=32", "data.img_size=32 but backbone.img_size=16"),
        ("data.channels=2", "data.channels must be 1 or 3"),
        ("name=..", "name must be a plain folder name"),
        ("name=a/b", "name must be a plain folder name"),
        ("name=''", "name must be a plain folder name"),
        ("output_dir=''", "output_dir is empty"),
        ("train=", "would replace the whole 'train' section"),
        ("train=5", "would replace the whole 'train' section"),
        ("method=l2p", "set its keys instead, e.g. method.name=<value>"),
        ("train={epochs: 1", "override 'train={epochs: 1': the value is not valid YAML (column 11: expected ',' or '}'"),
        ("train.betas=[0.9, 0.99", "not valid YAML (column 11: expected ',' or ']', but got '<stream end>'); close its "
                                   "brackets, or quote it"),
        # a key like no other gets the keys that would be valid in its place
        ("foo=1", "unknown config key 'foo'; the top level has name, seed"),
        ("train.zzz=1", "unknown config key 'train.zzz'; 'train' has epochs, batch_size"),
        ("method.qqq=1", "unknown config key 'method.qqq'; 'method' has pool_size"),
        # range errors give the value received
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.eval_batch_size=-2", "train.eval_batch_size must be >= 1, got -2"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("method.pool_size=0", "method.pool_size must be >= 1, got 0"),
        ("method.top_k=-1", "method.top_k must be >= 1, got -1"),
        ("method.pull_lambda=-0.5", "method.pull_lambda must be >= 0, got -0.5"),
        ("method.pull_lambda=.nan", "method.pull_lambda must be >= 0, got nan"),
        ("data.train_per_class=0", "data.train_per_class must be >= 1 or null (all images), got 0"),
    ],
)
def test_bad_config_rejected_with_hint(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_l2p", [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_dualprompt_ranges_give_the_value():
    with pytest.raises(ConfigError, match="method.e_length must be >= 1, got 0"):
        load_config("tiny_dualprompt", ["method.e_length=0"])
    with pytest.raises(ConfigError, match="method.pull_lambda must be >= 0, got -1"):
        load_config("tiny_dualprompt", ["method.pull_lambda=-1"])


def test_a_bare_name_of_a_local_yaml_file_says_to_give_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_mine_pgp.yaml").write_text("_base_: tiny_l2p\n")
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny_mine_pgp'; to use the file tiny_mine_pgp.yaml, "
                                          r"give its path: tiny_mine_pgp.yaml$"):
        load_config("tiny_mine_pgp")
    assert load_config("tiny_mine_pgp.yaml").method.name == "l2p"


def test_unknown_preset_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'cifar100_10_l2p'"):
        load_config("cifar100_10_l2")


def test_base_inheritance_merges_sections(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("_base_: tiny_l2p\nname: child\ntrain: {epochs: 3}\n")
    cfg = load_config(str(child))
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 16 and cfg.data.dataset == "mnist5k"


def test_roundtrip_through_dict():
    cfg = load_config("tiny_dualprompt_pgp")
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_quoted_override_keeps_yaml_words_as_text():
    cfg = load_config("tiny_l2p", ["name='on'", "output_dir='2024'"])
    assert (cfg.name, cfg.output_dir) == ("on", "2024")


def test_override_requires_equals():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(load_raw("tiny_l2p"), ["train.lr"])


def test_a_section_given_whole_adds_to_the_preset():
    cfg = load_config("tiny_l2p", ["train={epochs: 3}", "train={}"])
    preset = load_config("tiny_l2p")
    assert cfg.train.epochs == 3 and cfg.train.batch_size == preset.train.batch_size
    assert cfg.train.max_steps_per_task == preset.train.max_steps_per_task


def test_a_scalar_for_a_mapping_key_says_how_to_set_an_entry():
    with pytest.raises(ConfigError) as e:
        load_config("tiny_l2p_pgp", ["pgp.eps=0.9"])
    assert str(e.value) == (
        "config key 'pgp.eps' must be a mapping, got 0.9; set one entry as pgp.eps.NAME=VALUE"
        ' or all as "pgp.eps={NAME: VALUE}"'
    )
    assert load_config("tiny_l2p_pgp", ["pgp.eps.prompt=0.9"]).pgp.eps == {"prompt": 0.9}


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    """An empty file would train every default (a full ViT-B/16 run), not what anyone wrote it for."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty.yaml' is empty; give its settings, or start from a preset with _base_"):
        load_config(str(path))


def test_method_section_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("_base_: tiny_l2p\nmethod: l2p\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == (
        "config section 'method' must be a mapping, got 'l2p'; to pick a method set method.name=..."
    )


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda p: p.write_text("train:\n  epochs: 2\ntrain:\n  lr: 0.1\n"),
         "is not valid YAML (line 3, column 1: key 'train' is given twice); fix that line"),
        (lambda p: p.write_text("train: {epochs: 2\n"), "is not valid YAML (line 2, column 1: "),
        (lambda p: p.write_bytes(b"name: caf\xe9\n"), "cannot be read (not UTF-8 text); give a UTF-8 YAML file"),
        (lambda p: p.mkdir(), "cannot be read (Is a directory)"),
    ],
)
def test_unreadable_yaml_names_file_line_and_fix(tmp_path, write, expected):
    path = tmp_path / "c.yaml"
    write(path)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert f"config '{path}' " in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def test_pgpcl_configs_names_the_preset_that_does_not_load(tmp_path, monkeypatch, capsys):
    import shutil

    import pgpcl.config as config
    from pgpcl.cli import main

    presets = tmp_path / "configs"
    shutil.copytree(config.preset_dir(), presets)
    (presets / "tiny_mine_pgp.yaml").write_text("_base_: _tiny\nname: tiny_mine_pgp\nmethod: {name: vpt_shallow}\n")
    monkeypatch.setattr(config, "preset_dir", lambda: presets)
    assert main(["configs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgpcl: error: preset tiny_mine_pgp does not load: unknown method 'vpt_shallow'"), err
    with pytest.raises(ConfigError, match="method.text_init_std must be >= 0, got -1.0"):
        load_config("tiny_clip", ["method.text_init_std=-1"])


def test_released_dualprompt_starts_each_e_prompt_from_the_previous_tasks(tmp_path):
    """--shared_prompt_pool of the released configs: before task t, E-prompt t-1's key- and value-prefixes
    are copied into E-prompt t (not its matching key); the default keeps independent initialisations."""
    from pgpcl.engine.trainer import Trainer

    for preset in ("cifar100_10_dualprompt", "cifar100_20_dualprompt_pgp", "cub200_5_dualprompt",
                   "imagenet_r_10_dualprompt_pgp", "tiny_imagenet_10_dualprompt"):
        assert load_config(preset).method.params.shared_prompt_pool, preset
    small = ["train.progress=false", "data.train_per_class=8", "data.test_per_class=2"]
    for shared in (True, False):
        tr = Trainer(load_config("tiny_dualprompt", [*small, f"method.shared_prompt_pool={str(shared).lower()}"]),
                     tmp_path / str(shared))
        tr.run_task(0)
        pool = tr.method.pool
        trained, fresh, key = pool.prompts[0].detach().clone(), pool.prompts[1].detach().clone(), pool.keys[1].clone()
        tr.method.begin_task(1)
        assert torch.equal(pool.prompts[1], trained if shared else fresh)
        assert not torch.equal(trained, fresh) and torch.equal(pool.keys[1], key)


def test_a_config_of_another_method_is_named_by_its_method():
    """--continue / resume refusals name the first difference: for another method that is method.name, not
    whichever of its keys sorts first (method.e_layers)."""
    from pgpcl.config import config_difference

    a, b = load_config("tiny_l2p").to_dict(), load_config("tiny_dualprompt").to_dict()
    assert config_difference(a, b) == ("method.name", "l2p", "dualprompt")
    assert config_difference(a, load_config("tiny_l2p", ["train.lr=0.5"]).to_dict())[0] == "train.lr"


def test_keys_a_config_sets_but_does_not_use_are_no_difference():
    """--continue / --resume compare configs: train.epochs online (one pass) and data.order_seed with the
    label order (nothing drawn) change no number, so they are no other config."""
    from pgpcl.config import config_difference

    online = load_config("tiny_l2p", ["data.setting=online"]).to_dict()
    assert config_difference(online, load_config("tiny_l2p", ["data.setting=online", "train.epochs=5"]).to_dict()) is None
    base = load_config("tiny_l2p").to_dict()
    assert config_difference(base, load_config("tiny_l2p", ["train.epochs=5"]).to_dict())[0] == "train.epochs"
    assert config_difference(base, load_config("tiny_l2p", ["data.order_seed=3"]).to_dict()) is None
    rand = ["data.class_order=random"]
    assert config_difference(load_config("tiny_l2p", rand).to_dict(),
                             load_config("tiny_l2p", [*rand, "data.order_seed=3"]).to_dict())[0] == "data.order_seed"
