"""Answers a user can trust, on synthetic result CSVs (no TensorFlow): machines and runs kept apart,
units normalised per file, ``bench compare`` verdicts and exit codes, the self-contained HTML
report, the plots' helpers, machine facts and their cache, and the sweep's repeat plan."""

from __future__ import annotations

import argparse
import math
from html.parser import HTMLParser

import pandas as pd
import pytest

from bench import cli as bench_cli
from bench import configs, machine, plots
from bench.compare import compare, parse_threshold, verdict
from bench.report import build, write_reports
from bench.results import groups, load, median_runs
from bench.run import sweep_jobs
from flowers_fast.errors import UserError

from test_report import COLUMNS, row


def machine_rows(machine_id, run_id, scale=1.0, brand="Test CPU A"):
    """A small run of one machine: repeats with spread, one failed configuration."""
    rows = []
    for k, (naive_t, tf_t, fc_t) in enumerate([(100, 50, 20), (104, 52, 21), (98, 49, 19)]):
        for name, total, acc in (("naive", naive_t, 0.80), ("tfdata", tf_t, 0.90), ("featcache", fc_t, 0.89)):
            r = row(name, "cpu", acc, total * scale, 450 / (total / 6), 2000 + 100 * k, repeat=k)
            r.update(run_id=run_id, machine_id=machine_id, cpu_brand=brand, cpu_logical_cores=2, ram_gb=24.0,
                     train_s=total * scale * 0.7, feature_pass_s=total * scale * 0.2 if name == "featcache" else "",
                     feature_pass_img_s=180 if name == "featcache" else "", test_images=150,
                     feature_pass_shared_cores_img_s=170 if name == "featcache" else "",
                     feature_pass_bound_fraction=0.72 if name == "featcache" else "")
            rows.append(r)
    rows.append(row("tfdata-dct", "cpu", None, None, None, None, status="error") | {"run_id": run_id,
                                                                                   "machine_id": machine_id})
    return rows


def write(path, rows):
    cols = list(COLUMNS) + [c for c in rows[0] if c not in COLUMNS]
    pd.DataFrame(rows).reindex(columns=cols).to_csv(path, index=False)
    return path


@pytest.fixture
def two_machines(tmp_path):
    a = write(tmp_path / "a.csv", machine_rows("aaaa111111", "r1"))
    b = write(tmp_path / "b.csv", machine_rows("bbbb222222", "r2", scale=2.0, brand="Test CPU B"))
    return a, b


# --- machines, runs and units ------------------------------------------------------------------

def test_two_machines_give_two_reports_and_pool_merges_on_purpose(two_machines, capsys):
    df = load(list(two_machines))
    parts = groups(df)
    assert len(parts) == 2
    assert "aaaa111111" in parts[0][0] and "Test CPU A" in parts[0][0] and "run r1" in parts[0][0]
    assert "bbbb222222" in parts[1][0]
    reports = build(df)
    naive_totals = [r.tables["cpu"].loc["naive", "total s"] for r in reports]
    assert naive_totals == [100, 200]  # each machine's own median, not a median across machines
    assert [r.tables["cpu"].loc["naive", "ok"] for r in reports] == [3, 3]

    assert bench_cli.main(["report", *map(str, two_machines)]) == 0
    out = capsys.readouterr().out
    assert out.count("== machine") == 2 and out.count("device cpu") == 2
    assert "a.csv: 10 rows" in out and "b.csv: 10 rows" in out  # says what it merged

    pooled = build(df, pool=True)
    assert len(pooled) == 1 and "2 runs on 2 machine(s) pooled" in pooled[0].label
    assert pooled[0].tables["cpu"].loc["naive", "ok"] == 6


def test_fraction_and_percent_files_give_the_same_accuracy(tmp_path):
    rows = machine_rows("aaaa111111", "r1")
    frac = write(tmp_path / "frac.csv", rows)
    pct_rows = [dict(r, run_id="r2", test_accuracy=(r["test_accuracy"] * 100 if r["test_accuracy"] else ""))
                for r in rows]
    pct = write(tmp_path / "pct.csv", pct_rows)
    df = load([frac, pct])
    assert set(df.loc[df["name"] == "naive", "acc_pct"]) == {80.0}
    a, b = build(df)
    assert a.tables["cpu"].loc["tfdata", "test acc %"] == pytest.approx(90.0)
    assert b.tables["cpu"].loc["tfdata", "test acc %"] == pytest.approx(90.0)
    assert any("pct.csv" in m and "percent" in m for m in df.attrs["merged"])
    assert any("frac.csv" in m and "fraction" in m for m in df.attrs["merged"])


# --- bench compare --------------------------------------------------------------------------

def test_compare_identical_files_is_within_noise_and_exits_0(two_machines, capsys):
    a = two_machines[0]
    table = compare(load(a), load(a))
    ok = table[table["config"] != "tfdata-dct"]
    assert set(ok["verdict"]) == {"within noise"} and (ok["ratio"] == 1.0).all()
    assert table.set_index("config").loc["tfdata-dct", "verdict"] == "failed in both"  # not a regression
    assert bench_cli.main(["compare", str(a), str(a)]) == 0
    assert "no regression" in capsys.readouterr().out


def test_compare_flags_a_25_percent_slower_configuration(tmp_path, two_machines, capsys):
    base = two_machines[0]
    rows = machine_rows("aaaa111111", "r1")
    for r in rows:
        if r["name"] == "tfdata":
            r["total_s"] *= 1.25
    new = write(tmp_path / "new.csv", rows)
    code = bench_cli.main(["compare", str(base), str(new), "--fail-if", "10%"])
    out = capsys.readouterr().out
    assert code == 1
    assert "regression beyond 10%: tfdata on cpu" in out
    table = compare(load(base), load(new), "total_s", 0.10).set_index("config")
    assert table.loc["tfdata", "verdict"] == "regression"
    assert table.loc["tfdata", "ratio"] == pytest.approx(1.25)
    assert table.loc["naive", "verdict"] == "within noise"
    # 25% slower is within a 30% threshold; and faster NEW is an improvement, not a failure.
    assert bench_cli.main(["compare", str(base), str(new), "--fail-if", "30"]) == 0
    capsys.readouterr()
    assert compare(load(new), load(base)).set_index("config").loc["tfdata", "verdict"] == "improvement"


def test_compare_uses_the_spread_not_just_medians():
    # Medians 12% apart, but the ranges overlap: within noise. Disjoint beyond 10%: regression.
    assert verdict((100, 90, 110), (112, 105, 118), 0.10, higher_is_better=False) == "within noise"
    assert verdict((100, 98, 102), (120, 115, 125), 0.10, higher_is_better=False) == "regression"
    # Throughput: lower is worse.
    assert verdict((100, 98, 102), (80, 78, 82), 0.10, higher_is_better=True) == "regression"
    assert verdict((100, 98, 102), (120, 115, 125), 0.10, higher_is_better=True) == "improvement"


def test_compare_failed_configuration_and_bad_flags(tmp_path, two_machines, capsys):
    base = two_machines[0]
    rows = [r if r["name"] != "featcache" else row("featcache", "cpu", None, None, None, None, status="error")
            | {"run_id": "r1", "machine_id": "aaaa111111", "repeat": r["repeat"]} for r in machine_rows("aaaa111111", "r1")]
    new = write(tmp_path / "failed.csv", rows)
    assert bench_cli.main(["compare", str(base), str(new)]) == 1
    assert "featcache on cpu" in capsys.readouterr().out
    assert bench_cli.main(["compare", str(base), str(base), "--fail-if", "ten"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fail-if" in err[0]
    assert bench_cli.main(["compare", str(base), str(base), "--metric", "nope"]) == 2
    assert "--metric nope" in capsys.readouterr().err
    assert parse_threshold("10%") == pytest.approx(0.10) and parse_threshold("5") == pytest.approx(0.05)
    with pytest.raises(UserError):
        parse_threshold("-1%")


def test_compare_accuracy_across_units(tmp_path, two_machines):
    rows = [dict(r, test_accuracy=(r["test_accuracy"] * 100 if r["test_accuracy"] else ""))
            for r in machine_rows("aaaa111111", "r1")]
    pct = write(tmp_path / "pct.csv", rows)
    table = compare(load(two_machines[0]), load(pct), "test_accuracy")
    assert set(table.loc[table["config"] != "tfdata-dct", "verdict"]) == {"within noise"}


# --- the HTML report ------------------------------------------------------------------------

class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.urls = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        for key in ("src", "href", "data", "action", "poster"):
            if attrs.get(key):
                self.urls.append(attrs[key])


def test_html_report_is_self_contained(two_machines, tmp_path):
    out = tmp_path / "report" / "r.html"
    md = tmp_path / "report" / "r.md"
    written = write_reports([two_machines[0]], markdown=md, html=out)
    assert set(written) == {out, md}
    page = out.read_text()
    parser = _Collector()
    parser.feed(page)
    assert parser.tags.count("table") >= 2  # results and provenance
    assert len(parser.imgs) == 3 and all(src.startswith("data:image/png;base64,") for src in parser.imgs)
    assert not [u for u in parser.urls if not u.startswith("data:")]
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "url(" not in page and "@import" not in page
    assert "Recommended on cpu: featcache" in page and "python -m bench run --device cpu --configs featcache" in page
    for fact in ("aaaa111111", "Test CPU A", "Provenance", "git commit"):
        assert fact in page
    assert list((tmp_path / "report").glob("*.png")) == []  # plots only embedded without --plot
    assert "![" not in md.read_text()


def test_report_command_writes_html(two_machines, tmp_path, capsys):
    out = tmp_path / "x.html"
    assert bench_cli.main(["report", str(two_machines[0]), "--html", str(out), "--plot"]) == 0
    assert out.exists() and out.read_text().count("data:image/png;base64,") == 3
    assert len(list(two_machines[0].parent.glob("a-*.png"))) == 3
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert bench_cli.main(["report", str(two_machines[0]), "--html", str(blocker / "r.html")]) == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--html" in err[0]


# --- plots ---------------------------------------------------------------------------------

def test_pareto_front():
    times = [8, 18, 24, 26, 28, float("nan")]
    accs = [97.3, 98.0, 97.3, 100.0, 96.7, 99.0]
    assert plots.pareto(times, accs) == [0, 1, 3]


def test_median_run_is_the_middle_repeat(two_machines):
    reps = median_runs(load(two_machines[0])).set_index("name")
    assert reps.loc["naive", "total_s"] == 100 and reps.loc["tfdata", "total_s"] == 50
    assert "tfdata-dct" not in reps.index  # no finished repeat


def test_plots_with_repeats_and_failures(two_machines, tmp_path):
    paths = plots.write_plots(load(two_machines[0]), tmp_path, "q")
    assert [p.name for p in paths] == ["q-time.png", "q-accuracy.png", "q-stages.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


# --- machine facts and their cache ------------------------------------------------------------

def test_host_facts_and_fingerprint():
    facts = machine.host_facts()
    for key in ("cpu_brand", "cpu_isa", "cpu_logical_cores", "cpu_physical_cores", "ram_gb", "os", "gpu_names",
                "tensorflow_version", "numpy_version", "opencv_version", "machine_id"):
        assert key in facts and facts[key] != "", key
    assert facts["cpu_logical_cores"] >= 1 and facts["ram_gb"] > 0
    assert len(facts["machine_id"]) == 10
    assert machine.fingerprint(facts) == facts["machine_id"]
    assert machine.fingerprint(dict(facts, tensorflow_version="0.0")) == facts["machine_id"]  # versions aside
    assert machine.fingerprint(dict(facts, cpu_brand="Other CPU")) != facts["machine_id"]
    assert machine.fingerprint(dict(facts, ram_gb=facts["ram_gb"] + 0.2)) == machine.fingerprint(facts) or \
        round(facts["ram_gb"] + 0.2) != round(facts["ram_gb"])


def test_measured_values_are_cached_per_machine_and_tf_version(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return 123.0

    m = machine.Measured(tmp_path, "abc", "2.21.0")
    value, when = m.get("matmul/cpu/float32", measure)
    again, when2 = machine.Measured(tmp_path, "abc", "2.21.0").get("matmul/cpu/float32", measure)
    assert (value, again, len(calls)) == (123.0, 123.0, 1) and when == when2
    machine.Measured(tmp_path, "abc", "2.22.0").get("matmul/cpu/float32", measure)  # another TF: measured again
    assert len(calls) == 2
    m.forget()
    m.get("matmul/cpu/float32", measure)
    assert len(calls) == 3
    (tmp_path / "machine" / "abc-tf2.21.0.json").write_text("not json")
    assert m.get("matmul/cpu/float32", measure)[0] == 123.0 and len(calls) == 4


# --- the sweep's repeat plan -------------------------------------------------------------------

def _args(**kw):
    """Parsed ``bench run`` flags: knob flags absent unless given, as argparse leaves them."""
    base = dict(repeats=None, preset="quick")
    base.update(kw)
    return argparse.Namespace(**base)


def test_quick_preset_repeats_training_configs_and_measures_the_breakdown_once():
    preset = configs.PRESETS["quick"]
    cfgs = configs.select(None, preset) + [configs.CONFIGS["modelonly-xla"]]  # and a model-only probe
    jobs, _ = sweep_jobs(_args(), preset, cfgs, ["cpu"], set())
    per = pd.Series([c.name for c, _ in jobs]).value_counts()
    for c in cfgs:
        assert per[c.name] == (preset.probe_repeats if c.pipeline == "modelonly" else preset.repeats) and \
            (c.pipeline == "modelonly" or per[c.name] >= 2), c.name
    for c, k in jobs:
        assert c.breakdown == (k == 0 or c.pipeline == "modelonly"), (c.name, k)
    assert [k for _, k in jobs] == sorted(k for _, k in jobs)  # repeat by repeat
    # --repeats applies to every configuration; a given --breakdown is kept in every repeat.
    jobs, _ = sweep_jobs(_args(repeats=2, breakdown=True), preset, cfgs, ["cpu"], set())
    assert len(jobs) == 2 * len(cfgs) and all(c.breakdown for c, _ in jobs)
    done = {(cfgs[0].name, "cpu", 0)}
    assert (cfgs[0].name, 0) not in [(c.name, k) for c, k in sweep_jobs(_args(), preset, cfgs, ["cpu"], done)[0]]


def test_smoke_preset_unchanged_one_repeat():
    preset = configs.PRESETS["smoke"]
    jobs, _ = sweep_jobs(_args(preset="smoke"), preset, configs.select(None, preset), ["cpu"], set())
    assert len(jobs) == len(preset.configs) and all(c.breakdown for c, _ in jobs)


def test_nan_safe_threshold_message():
    with pytest.raises(UserError, match="--fail-if"):
        parse_threshold("nan")
    assert math.isclose(parse_threshold(" 0% "), 0.0)


def test_the_time_plot_splits_off_the_fine_tune_phase_and_marks_fine_tuned_rows():
    run = pd.Series(dict(data_prep_s=2.0, first_epoch_s=6.0, train_s=40.0, fine_tune_phase_s=30.0, total_s=42.0))
    assert plots._parts(run) == {"prep": 2.0, "feature": 0.0, "first": 6.0, "later": 4.0, "fine": 30.0}
    frozen = pd.Series(dict(data_prep_s=2.0, first_epoch_s=6.0, train_s=40.0, total_s=42.0))
    assert plots._parts(frozen)["fine"] == 0.0 and plots._parts(frozen)["later"] == 34.0
    rows = pd.DataFrame(dict(fine_tune_epochs=[0, 5, 0, float("nan")], fine_tune=[False, False, True, "False"]))
    assert list(plots.fine_tuned(rows)) == [False, True, True, False]
    assert list(plots.fine_tuned(pd.DataFrame(dict(name=["a"])))) == [False]  # columns absent: frozen


def test_the_report_gives_both_phases_when_a_configuration_fine_tuned(tmp_path):
    from bench.report import summarise
    from test_report import COLUMNS

    rows = machine_rows("aaaa111111", "r1")
    tuned = row("tfdata", "cpu", 0.93, 121.0, 30, 2500) | dict(name="tfdata-ft", run_id="r1", machine_id="aaaa111111",
                                                               head_phase_s=30.0, fine_tune_phase_s=81.0,
                                                               fine_tune_epochs=5, train_s=111.0)
    rows.append(tuned)
    cols = list(dict.fromkeys(list(COLUMNS) + [c for r in rows for c in r]))
    pd.DataFrame(rows).reindex(columns=cols).to_csv(tmp_path / "ft.csv", index=False)
    table = summarise(load(tmp_path / "ft.csv"))["cpu"]
    assert list(table.columns[table.columns.get_loc("head phase s"):][:3]) == ["head phase s", "fine-tune phase s",
                                                                              "total s"]
    assert table.loc["tfdata-ft", "fine-tune phase s"] == 81.0 and pd.isna(table.loc["naive", "fine-tune phase s"])
    assert "total s" in table.columns and "head phase s" not in summarise(load(write(tmp_path / "f.csv",
                                                                                     machine_rows("a", "r")))
                                                                          )["cpu"].columns
