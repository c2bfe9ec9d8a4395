import errno
import json
import os
import stat
import statistics

import numpy as np
import pytest
from PIL import Image

from pgpcl.cli import main
from pgpcl.config import Config, load_config
from pgpcl.engine.results import new_results, read_results, write_results
from pgpcl.errors import PgpclError
from pgpcl.report import Stat, paired_difference, report_runs
from test_bad_input import fails, snapshot

# CIL matrices A[i][t] of 3-task runs; TIL = CIL + 5 everywhere.
CIL = {
    (False, 0): [[90.0, 85.0, 80.0], [None, 88.0, 82.0], [None, None, 86.0]],
    (False, 1): [[92.0, 86.0, 79.0], [None, 87.0, 80.0], [None, None, 84.0]],
    (True, 0): [[90.0, 88.0, 85.0], [None, 89.0, 86.0], [None, None, 86.0]],
    (True, 1): [[91.0, 89.0, 84.0], [None, 88.0, 85.0], [None, None, 85.0]],
}


def til_of(A):
    return [[None if a is None else a + 5.0 for a in row] for row in A]


def write_run(root, pgp, seed, A, status="complete", name=None, eps=None, dataset="cifar100", weights=None,
              train=None, preset=None, data=None):
    cfg = Config() if preset is None else load_config(preset)
    cfg.name, cfg.seed, cfg.output_dir = name or f"{'pgp' if pgp else 'base'}-s{seed}", seed, str(root)
    for section, values in (("train", train), ("data", data)):
        for k, v in (values or {}).items():
            setattr(getattr(cfg, section), k, v)
    cfg.backbone.weights = weights
    if weights == "hub":
        cfg.backbone.pretrained_tag = "orig_in21k"  # the released presets' ImageNet-21k weights
    cfg.pgp.enabled = pgp
    cfg.data.num_tasks = len(A)
    cfg.data.dataset = dataset
    if eps is not None:
        cfg.pgp.eps = {"prompt": eps}
    r = new_results(cfg, num_tasks=len(A), task_classes=[[t] for t in range(len(A))])
    r.acc = {"cil": [list(row) for row in A], "til": til_of(A)}
    r.mark(status)
    run_dir = root / cfg.name
    write_results(run_dir / "results.json", r)
    return run_dir


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    return [write_run(root, pgp, seed, A) for (pgp, seed), A in CIL.items()]


# Independent, by-definition metric computations for the expected table values.
def final(A):
    return statistics.fmean(row[-1] for row in A)


def avg_inc(A):
    T = len(A)
    return statistics.fmean(statistics.fmean(A[i][t] for i in range(t + 1)) for t in range(T))


def forget(A):
    T = len(A) - 1
    return statistics.fmean(max(A[i][i:T]) - A[i][T] for i in range(T))


def bwt(A):
    T = len(A) - 1
    return statistics.fmean(A[i][T] - A[i][i] for i in range(T))


def pm(values, signed=False):
    m, s = statistics.fmean(values), statistics.stdev(values)
    return f"{m:+.2f} +- {s:.2f}" if signed else f"{m:.2f} +- {s:.2f}"


def line_of(text, start, section=0):
    part = text.split("PGP - baseline")[section]
    return next(line for line in part.splitlines() if line.startswith(start))


def test_table_values(runs, tmp_path):
    text = report_runs(runs, out_dir=tmp_path / "rep", plots=False)
    for pgp, label in [(False, "l2p "), (True, "l2p-PGP")]:
        mats = [CIL[(pgp, s)] for s in (0, 1)]
        row = line_of(text, label)
        for f in (final, avg_inc, forget, bwt):
            assert pm([f(A) for A in mats]) in row, (f.__name__, row)
        assert pm([final(til_of(A)) for A in mats]) in row
        assert pm([forget(til_of(A)) for A in mats]) in row
        assert "cifar100" in row and " cil " in row and " 2 " in row


def test_paired_section(runs, tmp_path):
    text = report_runs(runs, out_dir=tmp_path / "rep", plots=False)
    assert "PGP - baseline (paired by seed" in text
    row = line_of(text, "l2p-PGP", section=1)
    for f in (final, avg_inc, forget, bwt):
        diffs = [f(CIL[(True, s)]) - f(CIL[(False, s)]) for s in (0, 1)]
        assert pm(diffs, signed=True) in row, (f.__name__, row)


def test_paired_difference_matches_by_seed(tmp_path):
    root = tmp_path / "runs"
    a = [read_results(write_run(root, True, s, CIL[(True, s % 2)]) / "results.json") for s in (0, 1, 7)]
    b = [read_results(write_run(root, False, s, CIL[(False, s)]) / "results.json") for s in (1, 0)]
    d = paired_difference(a, b)
    assert d.seeds == [0, 1]
    diffs = [final(CIL[(True, s)]) - final(CIL[(False, s)]) for s in (0, 1)]
    assert d.stats["cil_final"].mean == pytest.approx(statistics.fmean(diffs))
    assert d.stats["cil_final"].std == pytest.approx(statistics.stdev(diffs))
    assert d.stats["cil_final"].n == 2


def test_stat_format():
    assert Stat.of([80.0]).format() == "80.00"
    assert Stat.of([None]).format() == "-"
    assert Stat.of([1.0, 2.0, None]).n == 2
    assert Stat.of([1.0, 3.0]).format(pm="±") == f"2.00 ± {statistics.stdev([1.0, 3.0]):.2f}"
    # a mean that rounds to zero has no sign: "-0.00" reads as a (tiny) loss
    assert Stat.of([-0.01, 0.0033]).format(signed=True).startswith("+0.00 +- ")
    assert Stat.of([-0.004]).format() == "0.00" and Stat.of([-0.006]).format(signed=True) == "-0.01"


def test_plots_and_summary(runs, tmp_path):
    out = tmp_path / "rep"
    text = report_runs(runs, out_dir=out)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3  # one heatmap per group + the curves
    for p in pngs:
        assert p.stat().st_size > 0
        with Image.open(p) as im:
            assert im.format == "PNG"
            im.verify()
    summary = json.loads((out / "summary.json").read_text())
    assert [g["n"] for g in summary["groups"]] == [2, 2]
    assert summary["curves_plot"] == "accuracy_curves.png"
    base = next(g for g in summary["groups"] if not g["pgp"])
    assert base["metrics"]["cil_final"]["mean"] == pytest.approx(
        statistics.fmean(final(CIL[(False, s)]) for s in (0, 1))
    )
    assert base["curves"]["cil"]["mean"][0] == pytest.approx(91.0)
    assert base["acc_mean"]["cil"][1][0] is None
    assert len(summary["paired"]) == 1 and summary["paired"][0]["seeds"] == [0, 1]
    assert (out / "table.txt").read_text() in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "runs.csv" in summary["files"]


def test_a_staging_folder_of_a_killed_report_is_removed_by_the_next(runs, tmp_path):
    """SIGKILL mid-report leaves its hidden staging folder; the next report there removes it, but not the
    staging folder of a report still writing (its process alive)."""
    out = tmp_path / "rep"
    report_runs(runs, out_dir=out, plots=False)
    dead = out / ".pgpcl-report-4194399-abc"  # above Linux's largest pid: no such process
    live = out / f".pgpcl-report-{os.getpid()}-def"
    for stage in (dead, live):
        stage.mkdir()
        (stage / "table.txt").write_text("half a report")
    report_runs(runs, out_dir=out, plots=False)
    assert not dead.exists() and (live / "table.txt").read_text() == "half a report"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [live.name]


def test_runs_csv_has_one_row_per_run_with_its_metrics(runs, tmp_path):
    import csv

    out = tmp_path / "rep"
    report_runs(runs, out_dir=out, plots=False)
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 4 and {(r["pgp"], r["seed"]) for r in rows} == {(p, s) for p in ("true", "false") for s in "01"}
    for row in rows:
        A = CIL[(row["pgp"] == "true", int(row["seed"]))]
        assert float(row["cil_final"]) == pytest.approx(final(A))
        assert float(row["cil_avg_inc"]) == pytest.approx(avg_inc(A))
        assert float(row["til_final"]) == pytest.approx(final(til_of(A)))
        assert row["dataset"] == "cifar100" and row["setting"] == "cil" and row["run"].endswith("results.json")
    base = [r for r in rows if r["pgp"] == "false"]
    assert len({r["group"] for r in base}) == 1  # the seeds of one configuration share the table's label


def test_curves_pair_each_baseline_with_its_pgp_variants_by_colour(tmp_path):
    from matplotlib.figure import Figure

    from pgpcl.report.plots import _curve_panel
    from pgpcl.report.runs import group_runs, load_runs

    root = tmp_path / "runs"
    for s in (0, 1):
        write_run(root, False, s, CIL[(False, s)])
        write_run(root, True, s, CIL[(True, s)], name=f"eps5-{s}", eps=0.5)
        write_run(root, True, s, CIL[(True, s)], name=f"eps9-{s}", eps=0.9)
        write_run(root, False, s, CIL[(False, s)], name=f"imr-{s}", dataset="imr")
    groups, _ = group_runs(load_runs([root])[0])
    ax = Figure().subplots()
    _curve_panel(ax, groups, "cil")
    lines = {line.get_label().split(" (n=")[0]: line for line in ax.lines}
    cifar = [line for label, line in lines.items() if "cifar100" in label]
    assert len(cifar) == 3 and len({line.get_color() for line in cifar}) == 1
    assert sorted(line.get_linestyle() for line in cifar) == ["-", "--", "--"]
    imr = next(line for label, line in lines.items() if " imr " in label)
    assert imr.get_color() != cifar[0].get_color() and imr.get_linestyle() == "-"


def test_markdown(runs, tmp_path):
    text = report_runs(runs, out_dir=tmp_path / "rep", plots=False, fmt="markdown")
    assert "| method | dataset | setting | n |" in text
    assert "±" in text and "### PGP - baseline" in text
    assert (tmp_path / "rep" / "table.md").exists()
    with pytest.raises(PgpclError, match="unknown report format"):
        report_runs(runs, plots=False, fmt="html")


def test_single_seed_and_default_out_dir(tmp_path, monkeypatch):
    run = write_run(tmp_path / "runs", False, 0, CIL[(False, 0)])
    text = report_runs([run])
    row = line_of(text, "l2p")
    assert f"{final(CIL[(False, 0)]):.2f}" in row and "+-" not in row
    assert "PGP - baseline" not in text
    assert (run / "report" / "summary.json").exists()
    monkeypatch.chdir(tmp_path)
    other = write_run(tmp_path / "runs", False, 1, CIL[(False, 1)])
    report_runs([run, other])
    assert (tmp_path / "report" / "accuracy_curves.png").exists()


def test_no_files_without_plots_or_out_dir(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_runs(runs, plots=False)
    assert not (tmp_path / "report").exists()


def test_heatmap_title_says_how_many_runs_each_column_averages(runs, tmp_path):
    from pgpcl.report.plots import matrix_title
    from pgpcl.report.runs import group_runs, load_runs

    partial = [[90.0, None, None], [None, None, None], [None, None, None]]
    running = write_run(tmp_path / "runs", False, 5, partial, status="running")
    groups, _ = group_runs(load_runs([*runs, running], include_incomplete=True)[0])
    base = next(g for g in groups if not g.first.pgp)
    assert matrix_title(base) == f"{base.label} (mean of 3 runs; runs per column: 3 2 2)"
    pgp = next(g for g in groups if g.first.pgp)
    assert matrix_title(pgp) == f"{pgp.label} (mean of 2 run(s))"


def test_incomplete_runs_are_skipped(runs, tmp_path):
    partial = [[90.0, None, None], [None, None, None], [None, None, None]]
    running = write_run(tmp_path / "runs", False, 5, partial, status="running")
    text = report_runs([*runs, running], plots=False)
    assert f"skipped {(running / 'results.json').resolve()} (status running, 1/3 tasks done)" in text
    assert " 2 " in line_of(text, "l2p ")
    text = report_runs([*runs, running], plots=False, include_incomplete=True)
    assert " 3 " in line_of(text, "l2p ")
    with pytest.raises(PgpclError, match="none of the 1 results file") as e:
        report_runs([running], plots=False)
    # the hint names a command that exists: pgpcl report has no option to include incomplete runs
    assert "include incomplete" not in str(e.value) and "pgpcl train --resume RUN_DIR" in str(e.value)


def test_include_incomplete_prefers_a_complete_run_and_says_when_tasks_differ(runs, tmp_path):
    partial = [[90.0, None, None], [None, None, None], [None, None, None]]
    write_run(tmp_path / "again", False, 0, partial, status="running")  # newer than seed 0's complete run
    text = report_runs([*runs, tmp_path / "again"], plots=False, include_incomplete=True)
    assert f"seed 0 repeats; used {runs[0] / 'results.json'}, ignored {tmp_path / 'again'}" in text
    newer = write_run(tmp_path / "other", False, 7, partial, status="running")  # a seed of its own
    text = report_runs([*runs, newer], plots=False, include_incomplete=True)
    assert "its runs stopped after different tasks (1, 3 of 3); its final numbers mix them" in text


def test_no_results_found(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PgpclError) as e:
        report_runs([tmp_path / "empty"])
    assert "\n" not in str(e.value)


def test_grouping_variants_and_duplicates(tmp_path):
    root = tmp_path / "runs"
    for s in (0, 1):
        write_run(root, True, s, CIL[(True, s)], name=f"eps5-{s}", eps=0.5)
        write_run(root, True, s, CIL[(True, s)], name=f"eps9-{s}", eps=0.9)
        write_run(root, False, s, CIL[(False, s)])
    write_run(root, False, 0, CIL[(False, 1)], name="base-s0-again")  # same config and seed: a rerun
    write_run(root, False, 0, CIL[(False, 0)], dataset="imr", name="imr")
    text = report_runs([root], plots=False)
    assert "l2p-PGP [pgp.eps.prompt=0.5]" in text and "l2p-PGP [pgp.eps.prompt=0.9]" in text
    paired = text.split("PGP - baseline")[1]
    assert paired.count("l2p-PGP [") == 2  # both PGP variants paired with the one baseline
    assert "seed 0 repeats" in text
    imr = [line for line in text.splitlines() if " imr " in line]
    assert len(imr) == 1 and imr[0].startswith("l2p ") and " 1 " in imr[0]


def test_variants_tell_every_group_apart_and_a_pgp_group_shows_its_baselines(tmp_path):
    """Three baselines that differ in four keys, and a PGP group beside one of them. Each label shows every
    key that differs: 'batch_size=16' against 'batch_size=32' alone would credit the difference to the
    batch size when lr and epochs differ too."""
    root = tmp_path / "runs"
    settings = {"a": dict(lr=0.01, epochs=1, batch_size=16), "b": dict(lr=0.05, epochs=2, batch_size=32),
                "c": dict(lr=0.01, epochs=1, batch_size=16, weight_decay=0.1)}
    for name, train in settings.items():
        write_run(root, False, 0, CIL[(False, 0)], name=name, train=train)
    write_run(root, True, 0, CIL[(True, 0)], name="a-pgp", train=settings["a"])
    table = report_runs([root], plots=False).split("PGP - baseline")
    labels = [line.split("  ")[0] for line in table[0].splitlines() if line.startswith("l2p")]
    a = "train.batch_size=16, train.epochs=1, train.lr=0.01, train.weight_decay=0.0"
    assert labels == [f"l2p [{a}]",
                      "l2p [train.batch_size=16, train.epochs=1, train.lr=0.01, train.weight_decay=0.1]",
                      "l2p [train.batch_size=32, train.epochs=2, train.lr=0.05, train.weight_decay=0.0]",
                      f"l2p-PGP [{a}]"]  # the variant of its baseline
    assert f"l2p-PGP [{a}]" in table[1]


def test_beyond_four_differing_keys_a_label_shows_those_that_tell_groups_apart_and_counts_the_rest(tmp_path):
    root = tmp_path / "runs"
    write_run(root, False, 0, CIL[(False, 0)], name="a", train=dict(lr=0.01, epochs=1, batch_size=16))
    write_run(root, False, 0, CIL[(False, 0)], name="b", train=dict(lr=0.05, epochs=2, batch_size=32, weight_decay=0.1,
                                                                      momentum=0.5))
    labels = [line.split("  ")[0] for line in report_runs([root], plots=False).splitlines() if line.startswith("l2p")]
    assert labels == ["l2p [train.batch_size=16; 4 more keys differ]", "l2p [train.batch_size=32; 4 more keys differ]"]


def test_online_runs_that_differ_in_epochs_only_are_one_group_and_dil_names_its_domains(tmp_path):
    """Online trains one pass whatever train.epochs says; a DIL run's data.dataset is not what it read."""
    root = tmp_path / "runs"
    for s, epochs in ((0, 1), (1, 3)):
        write_run(root, False, s, CIL[(False, s)], name=f"online-{s}", train={"epochs": epochs},
                  data={"setting": "online"})
    write_run(root, False, 0, CIL[(False, 0)], name="dil", data={"setting": "dil", "domains": ["mnist5k", "/d/fmnist/"]})
    text = report_runs([root], plots=False)
    online = [line for line in text.splitlines() if " online " in line]
    assert len(online) == 1 and " 2 " in online[0] and "epochs" not in online[0]
    assert any(line.split()[1:3] == ["mnist5k+fmnist", "dil"] for line in text.splitlines())


def test_an_order_seed_with_the_label_order_is_the_same_experiment(tmp_path):
    root = tmp_path / "runs"
    write_run(root, True, 0, CIL[(True, 0)], name="plain")
    write_run(root, True, 1, CIL[(True, 1)], name="seeded", data={"order_seed": 3})  # label order: nothing drawn
    text = report_runs([root], plots=False)
    assert "order_seed" not in text and " 2 " in line_of(text, "l2p-PGP")


def test_variant_label_of_a_default_eps_against_a_set_one(tmp_path):
    """pgp.eps={} (the method's defaults) against pgp.eps.prompt=0.9: one key differs, shown as such."""
    root = tmp_path / "runs"
    for s in (0, 1):
        write_run(root, True, s, CIL[(True, s)], name=f"default-{s}")
        write_run(root, True, s, CIL[(True, s)], name=f"eps9-{s}", eps=0.9)
    text = report_runs([root], plots=False)
    assert "l2p-PGP [pgp.eps.prompt=default]" in text and "l2p-PGP [pgp.eps.prompt=0.9]" in text
    assert "pgp.eps=" not in text


def test_published_numbers_beside_runs_of_the_published_experiment(tmp_path):
    """A 10-split CIFAR-100 L2P-PGP run on pretrained ViT-B/16 gets the paper's 84.34 / 5.59 beside it;
    the same config on a random backbone (or a shrunk one) is another experiment and gets none."""
    import json

    from pgpcl.report.published import published_for

    ten = [[None] * i + [80.0 - i] + [70.0] * (9 - i) for i in range(10)]  # final 70.1, forgetting 6.0
    root = tmp_path / "runs"
    for s in (0, 1):
        write_run(root, True, s, ten, name=f"vitb-{s}", weights="hub", preset="cifar100_10_l2p_pgp")
        write_run(root, True, s, ten, name=f"random-{s}", preset="cifar100_10_l2p_pgp")
    out = tmp_path / "rep"
    text = report_runs([root], out_dir=out, plots=False)
    section = text.split("Published numbers (Qiao et al., ICLR 2024 (PGP): CIL, ViT-B/16 ImageNet-21k)")[1]
    line = next(ln for ln in section.splitlines() if ln.startswith("l2p-PGP"))
    assert "84.34" in line and "-14.24" in line and "5.59" in line and "+0.41" in line
    assert "never negative" in section  # the note on which forgetting is compared
    assert len([ln for ln in section.splitlines() if ln.startswith("l2p")]) == 1  # not the random-backbone group
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert sorted(str(g["published"] and g["published"]["cil_final"]) for g in groups) == ["84.34", "None"]
    r = load_results_of(root / "vitb-0")
    assert published_for(r).final_acc == 84.34
    r.config["backbone"]["pretrained_tag"] = "augreg_in21k_ft_in1k"  # other pretraining
    assert published_for(r) is None
    r.config["backbone"].update(pretrained_tag="augreg_in21k", embed_dim=384)  # another model
    assert published_for(r) is None
    # the released protocol, changed: a pre-flight run, fewer epochs, a local weights file (the same)
    r.config["backbone"].pop("embed_dim")
    assert published_for(r) is not None
    for section, key, value in (("train", "max_steps_per_task", 2), ("train", "epochs", 1),
                                ("data", "train_per_class", 10), ("pgp", "num_samples", 64)):
        changed = load_results_of(root / "vitb-0")
        changed.config[section][key] = value
        assert published_for(changed) is None, key
    changed = load_results_of(root / "vitb-0")
    changed.config["backbone"]["weights"] = "/data/vit_b16_in21k.npz"
    changed.config["data"]["root"] = "/elsewhere"
    changed.config["train"]["eval_batch_size"] = 7  # a speed / memory setting
    changed.config["pgp"]["sample_batch_size"] = 3
    assert published_for(changed).final_acc == 84.34
    changed.config["pgp"]["mode"] = "reference"  # the released arithmetic: the very one the paper ran
    assert published_for(changed).final_acc == 84.34


def test_published_forgetting_is_compared_by_the_released_definition(tmp_path):
    """Task 0 ends at its best (50 -> 70): pgpcl's forgetting credits that as -20 for it, the released
    code (and so the paper's number) as 0; the published section must subtract like from like."""
    ten = [[None] * i + [80.0 - i] + [70.0] * (9 - i) for i in range(10)]  # forgetting 6.0 either way
    ten[0] = [50.0] + [60.0] * 8 + [70.0]  # task 0 rises: pgpcl max(50, 60) - 70 = -10, released 0
    root = tmp_path / "runs"
    write_run(root, True, 0, ten, name="vitb-0", weights="hub", preset="cifar100_10_l2p_pgp")
    out = tmp_path / "rep"
    text = report_runs([root], out_dir=out, plots=False)
    main, section = text.split("Published numbers")
    # pgpcl: tasks 1..8 forget 80 - i - 70 = 10 - i (mean over them 5.5), task 0 -10: (44 - 10) / 9
    assert f"{34 / 9:.2f}" in main
    line = next(ln for ln in section.splitlines() if ln.startswith("l2p-PGP"))
    assert f"{44 / 9:.2f}" in line and f"{44 / 9 - 5.59:+.2f}" in line and f"{34 / 9:.2f}" not in line
    group = json.loads((out / "summary.json").read_text())["groups"][0]
    assert group["metrics"]["cil_forgetting"]["mean"] == pytest.approx(34 / 9)
    assert group["published"]["this_cil_forgetting_released"]["mean"] == pytest.approx(44 / 9)
    assert group["published"]["cil_forgetting"] == 5.59


def load_results_of(run_dir):
    return read_results(run_dir / "results.json")


def test_pgp_subspace_section(tmp_path):
    """Basis rank after each task (mean over seeds) and the pooled leak, per protected group, from the
    results files' basis log and projection records; in the text, Markdown and summary.json."""
    root = tmp_path / "runs"
    A = CIL[(True, 0)]
    logs = {0: ([3, 5, 6], [2, 4, 4], [0.1, 0.3]), 1: ([4, 6, 8], [2, 4, 5], [0.2, 0.0])}
    paths = [write_run(root, False, 0, CIL[(False, 0)])]
    for seed, (prompt_ranks, key_ranks, leaks) in logs.items():
        path = write_run(root, True, seed, A)
        r = read_results(path / "results.json")
        r.extra["basis"] = [
            {"task": t, "group": g, "rank_before": 0, "rank_after": k, "dim": 768, "energy_captured": 0.5, "rows": 9}
            for t in range(3) for g, k in (("prompt", prompt_ranks[t]), ("key", key_ranks[t]))
        ]
        for t in (1, 2):
            r.add_projection(t, "prompt", prompt_ranks[t - 1], 768, leaks[t - 1])
            r.add_projection(t, "key", key_ranks[t - 1], 768, 1e-7)
        write_results(path / "results.json", r)
        paths.append(path)
    text = report_runs(paths, out_dir=tmp_path / "rep", plots=False)
    section = text.split("PGP subspaces")[1]
    prompt = next(line for line in section.splitlines() if "prompt" in line).split()
    assert prompt[:5] == ["l2p-PGP", "cifar100", "cil", "prompt", "768"]
    assert prompt[5:] == ["3.5", "5.5", "7", "0.3", "0.15"]  # ranks (3+4)/2, (5+6)/2, (6+8)/2; leak max, mean
    key = next(line for line in section.splitlines() if " key " in line).split()
    assert key[5:] == ["2", "4", "4.5", "1e-07", "1e-07"]
    assert "l2p " not in section  # baselines have no subspaces
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    subs = {g["label"]: g["pgp_subspaces"] for g in summary["groups"]}
    pgp_subs = next(v for k, v in subs.items() if k.startswith("l2p-PGP"))
    assert [s["group"] for s in pgp_subs] == ["prompt", "key"]
    assert pgp_subs[0]["leak_max"] == pytest.approx(0.3) and pgp_subs[0]["rank_after"][2]["mean"] == 7
    assert all(v == [] for k, v in subs.items() if not k.startswith("l2p-PGP"))
    md = report_runs(paths, out_dir=tmp_path / "md", plots=False, fmt="markdown")
    assert "| l2p-PGP | cifar100 | cil | prompt | 768 | 3.5 5.5 7 | 0.3 | 0.15 |" in md


def test_runs_written_before_a_config_key_existed_group_with_new_ones(tmp_path):
    """A results file from before a key was added (here: imports, train.num_threads and a method
    parameter) reads that key as its default, so it joins the new runs of the same config; keys that
    only say where or how fast a run went (train.num_threads, train.checkpoint_every) never split."""
    root = tmp_path / "runs"
    old = write_run(root, True, 0, CIL[(True, 0)], name="old")
    r = read_results(old / "results.json")
    del r.config["imports"], r.config["train"]["num_threads"]
    assert set(r.config["method"]) == {"name"}  # no method parameters stored at all
    write_results(old / "results.json", r)
    new = write_run(root, True, 1, CIL[(True, 1)], name="new")
    r = read_results(new / "results.json")
    r.config["train"]["num_threads"], r.config["train"]["checkpoint_every"] = 2, 500
    r.config["method"].update(pool_size=10, prompt_init="uniform")  # L2P's defaults, written out
    write_results(new / "results.json", r)
    text = report_runs([root], plots=False)
    rows = [line for line in text.splitlines() if line.startswith("l2p-PGP")]
    assert len(rows) == 1 and rows[0].split()[3] == "2" and "[" not in rows[0]
    # a real difference still splits them
    r.config["method"]["prompt_init"] = "zero"
    write_results(new / "results.json", r)
    assert "l2p-PGP [method.prompt_init=" in report_runs([root], plots=False)


def edit_json(path, change):
    """Apply ``change`` to the raw JSON of a results or summary file (bypassing every writer check)."""
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def pgp_run_with_logs(root):
    """A complete PGP run whose file holds timings, projection records and a basis log."""
    run = write_run(root, True, 0, CIL[(True, 0)])
    r = read_results(run / "results.json")
    r.add_timing(0, 1.0, 0.5, 0.1, 10, 100, setup_s=0.2, checkpoint_s=0.1)
    r.add_projection(1, "prompt", 4, 32, 0.2)
    r.extra["basis"] = [{"task": 0, "group": "prompt", "rank_before": 0, "rank_after": 4, "dim": 32,
                         "energy_captured": 0.6, "rows": 64}]
    write_results(run / "results.json", r)
    return run


MALFORMED = {
    "projection without group": (lambda d: d["projection"][0].pop("group"), "projection[0] lacks 'group'"),
    "dim null": (lambda d: d["projection"][0].update(dim=None), "projection[0].dim is null, expected an integer"),
    "group a number": (lambda d: d["projection"][0].update(group=3), "projection[0].group is 3, expected a string"),
    "leak text": (lambda d: d["projection"][0].update(leak="x"), 'projection[0].leak is "x", expected a number or null'),
    "rank text": (lambda d: d["projection"][0].update(rank="x"), 'projection[0].rank is "x", expected an integer'),
    "timing text": (lambda d: d["timings"][0].update(eval_s="x"), 'timings[0].eval_s is "x", expected a number'),
    "basis entry": (lambda d: d["basis"][0].pop("dim"), "basis[0] lacks 'dim'"),
    "basis without rank_before": (lambda d: d["basis"][0].pop("rank_before"), "basis[0] lacks 'rank_before'"),
    "basis energy text": (lambda d: d["basis"][0].update(energy_captured="x"),
                          'basis[0].energy_captured is "x", expected a number'),
    "basis rows text": (lambda d: d["basis"][0].update(rows="x"), 'basis[0].rows is "x", expected an integer'),
    "unknown setting": (lambda d: d.update(setting="xyz"), 'setting "xyz" is not one of cil, til, online, dil'),
    "metrics text": (lambda d: d["metrics"].update(cil="x"), 'metrics.cil is "x", expected an object'),
    "metric text": (lambda d: d["metrics"]["til"].update(bwt="x"), 'metrics.til.bwt is "x", expected a number or null'),
    "data not a mapping": (lambda d: d["config"].update(data=3), "config.data is 3, expected an object"),
    "method not a mapping": (lambda d: d["config"].update(method=[1]), "config.method is [1], expected an object"),
    "data missing": (lambda d: d["config"].pop("data"), "config lacks 'data'"),
    "dataset missing": (lambda d: d["config"]["data"].pop("dataset"), "config.data lacks 'dataset'"),
    "method name a list": (lambda d: d["config"]["method"].update(name=["l2p"]),
                           'config.method.name is ["l2p"], expected a string'),
    # valid JSON, but no float holds it (math.isfinite raised OverflowError)
    "huge accuracy": (lambda d: d["acc"]["cil"][0].__setitem__(0, 10**400), "acc.cil[0][0] is not a finite number"),
    "huge leak": (lambda d: d["projection"][0].update(leak=10**400), "projection[0].leak is not a finite number"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_results_entries_are_one_line_errors(case, tmp_path, capsys):
    """Every field the report reads is checked as the runs load: one line naming the file and the field,
    not a traceback (KeyError, TypeError) or a table that shows the damage (setting xyz, dataset ?)."""
    change, problem = MALFORMED[case]
    run = pgp_run_with_logs(tmp_path / "runs")
    edit_json(run / "results.json", change)
    fails(capsys, ["report", str(run), "--no-plots"],
          f"results file {(run / 'results.json').resolve()} is malformed: {problem}; rerun or restore it")


def test_a_stray_file_under_a_searched_folder_is_skipped_with_a_note(runs, tmp_path, capsys):
    """pgpcl report runs/: a foreign results.json or an empty folder among the runs is noted, not fatal;
    the same file named on its own stays an error (test above), and so does a folder of nothing else."""
    root = tmp_path / "runs"
    (root / "other_tool").mkdir()
    (root / "other_tool" / "results.json").write_text('{"accuracy": 0.9}')
    (tmp_path / "empty").mkdir()
    assert main(["report", str(root), str(tmp_path / "empty"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {(root / 'other_tool' / 'results.json').resolve()}, found under {root} (is malformed: " in out
    assert f"skipped {tmp_path / 'empty'} (no results.json below it)" in out
    assert "l2p-PGP" in out
    fails(capsys, ["report", str(root / "other_tool"), "--no-plots"], "is malformed")
    fails(capsys, ["report", str(tmp_path / "empty"), "--no-plots"], f"no results.json under {tmp_path / 'empty'}")


def test_timings_of_files_older_than_setup_s_still_report(tmp_path):
    run = pgp_run_with_logs(tmp_path / "runs")
    edit_json(run / "results.json", lambda d: [d["timings"][0].pop(k) for k in ("setup_s", "checkpoint_s")])
    assert "prompt" in report_runs([run], plots=False).split("PGP subspaces")[1]


@pytest.mark.parametrize("in_the_way", ["out", "out/sub"])
def test_out_folder_blocked_by_a_file(in_the_way, runs, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    out = tmp_path / in_the_way
    fails(capsys, ["report", *map(str, runs), "--no-plots", "--out", str(out)],
          f"cannot write the report to {out} (a file is in the way); choose a writable folder with --out")
    assert (tmp_path / "out").read_text() == "mine"


def fill_disk_at_write(monkeypatch, n):
    """Make the ``n``-th file write of pgpcl.io fail as on a full disk."""
    import pgpcl.io

    calls, fsync = [], os.fsync

    def full(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # the folder's own fsync after a rename: not a file write
            return fsync(fd)
        calls.append(fd)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(pgpcl.io.os, "fsync", full)


def test_disk_full_leaves_the_out_folder_as_it_was(runs, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    report_runs(runs, out_dir=out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    fill_disk_at_write(monkeypatch, 3)  # table and the first plot written, then the disk is full
    with pytest.raises(PgpclError, match=rf"cannot write the report to {out} \(No space left on device\); "
                                         r".* or free disk space"):
        report_runs(runs[:2], out_dir=out, fmt="markdown")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    # a folder that did not exist is not left behind half-written, nor are the folders made for it
    fill_disk_at_write(monkeypatch, 2)  # the summary, after the table
    with pytest.raises(PgpclError, match="No space left on device"):
        report_runs(runs, out_dir=tmp_path / "new" / "deeper" / "rep", plots=False)
    assert not (tmp_path / "new").exists()


def test_a_report_replaces_the_previous_report_in_its_folder(runs, tmp_path):
    """Only files an earlier report listed in its summary.json go; the user's own files stay."""
    out = tmp_path / "rep"
    report_runs(runs, out_dir=out)
    assert len(list(out.glob("*.png"))) == 3
    for name in ("notes.txt", "mine.png"):
        (out / name).write_text("mine")
    (tmp_path / "outside.png").write_text("mine")
    # a summary from before the "files" list names its plots only (and that report wrote no runs.csv)
    edit_json(out / "summary.json", lambda d: d.pop("files", None))
    (out / "runs.csv").unlink()
    report_runs([r for r in runs if "pgp" in r.name], out_dir=out)
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"00_l2p-pgp-cifar100-cil_acc_matrix.png", "accuracy_curves.png", "mine.png"}
    edit_json(out / "summary.json", lambda d: d["files"].extend(["../outside.png", "notes.txt"]))
    report_runs(runs, out_dir=out, plots=False, fmt="markdown")
    assert sorted(p.name for p in out.iterdir()) == ["mine.png", "notes.txt", "runs.csv", "summary.json", "table.md"]
    assert (tmp_path / "outside.png").exists()
    assert json.loads((out / "summary.json").read_text())["files"] == ["table.md", "runs.csv", "summary.json"]


@pytest.mark.parametrize("name", ["table.txt", "summary.json", "accuracy_curves.png", "runs.csv"])
def test_a_report_refuses_to_replace_a_file_no_report_wrote(name, runs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text('{"mine": 1}')
    before = snapshot(out)
    fails(capsys, ["report", *map(str, runs), "--out", str(out)],
          f"{out / name} exists and no pgpcl report wrote it; move it away or choose another folder with --out")
    assert snapshot(out) == before
    # a report there that did not list it (a table of the other format, written by hand) does not own it
    if name == "table.txt":
        (out / name).unlink()
        report_runs(runs, out_dir=out, plots=False, fmt="markdown")
        (out / name).write_text("mine")
        with pytest.raises(PgpclError, match="table.txt exists and no pgpcl report wrote it"):
            report_runs(runs, out_dir=out, plots=False)
        assert (out / name).read_text() == "mine"


def test_empty_paths_are_refused_and_a_closed_pipe_is_quiet(runs, tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    fails(capsys, ["report", ""], "an empty path was given")
    fails(capsys, ["report", *map(str, runs), "--out", " "], "--out is empty")
    assert not (tmp_path / "report").exists()
    # pgpcl report | head -1: the reader closes the pipe before the table is written
    proc = subprocess.Popen([sys.executable, "-m", "pgpcl", "report", *map(str, runs), "--no-plots"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "Exception ignored" not in err, err


def test_a_report_from_before_file_lists_may_be_replaced_but_never_deletes_a_table(runs, tmp_path):
    out = tmp_path / "rep"
    report_runs(runs, out_dir=out, plots=False)  # table.txt
    edit_json(out / "summary.json", lambda d: d.pop("files"))  # as written before summaries listed files
    (out / "runs.csv").unlink()  # (nor runs.csv)
    (out / "table.md").write_text("mine")
    report_runs(runs, out_dir=out, plots=False)  # replaces that report's table.txt
    assert (out / "table.md").read_text() == "mine" and (out / "table.txt").exists()


def test_a_dil_heatmap_names_each_tasks_domain():
    from matplotlib.figure import Figure

    from pgpcl.report.plots import _heatmap

    fig = Figure()
    ax, plain = fig.subplots(1, 2)
    m = np.array([[90.0, 80.0], [np.nan, 70.0]])
    _heatmap(fig, ax, m, "CIL", ["clipart", "sketch"])
    _heatmap(fig, plain, m, "CIL")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 clipart", "1 sketch"]
    assert "clipart" not in " ".join(t.get_text() for t in plain.get_yticklabels())
