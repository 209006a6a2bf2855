"""bench report / recommend / plots on small hand-made result CSVs (no TensorFlow needed)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bench import cli as bench_cli
from bench.plots import write_plots
from bench.recommend import recommend
from bench.report import load, medians, render_console, render_markdown, summarise
from flowers_fast.errors import DataError, UserError

COLUMNS = ("run_id preset name pipeline device device_name dataset weights precision compute_dtype xla_step "
           "xla_backbone naive_rgb channel_order epochs batch_size num_images image_size train_images test_images "
           "strategy replicas repeat status error test_accuracy test_loss data_prep_s first_epoch_s steady_epoch_s "
           "steady_epoch_min_s steady_epoch_max_s total_s train_img_s end_to_end_img_s eval_img_s input_only_img_s "
           "model_only_img_s e2e_fraction_of_model bottleneck peak_rss_mb peak_gpu_mb feature_pass_s tf_version "
           "python_version git_commit timestamp model_handle data_dir seed learning_rate").split()

PIPELINE = {"naive": "naive", "naive-rgb": "naive", "tfdata": "tfdata", "tfdata-xla": "tfdata",
            "tfdata-mixed": "tfdata", "tfdata-dct": "tfdata", "featcache": "featcache"}


def row(name, device, acc, total, train, rss, repeat=0, status="ok", steady=None):
    """One CSV row; status != ok rows have empty metrics."""
    r = dict.fromkeys(COLUMNS, "")
    r.update(run_id=f"run-{device}", preset="quick", name=name, pipeline=PIPELINE[name], device=device,
             device_name="Test CPU" if device == "cpu" else "Test GPU H0", dataset="synthetic", weights="random",
             precision="mixed" if "mixed" in name else "fp32", xla_step="xla" in name, xla_backbone=False,
             naive_rgb=name == "naive-rgb", channel_order="BGR" if name == "naive" else "RGB", epochs=5,
             batch_size=32, num_images=600, image_size=224, strategy="default", replicas=1, repeat=repeat,
             status=status, tf_version="2.99.0", python_version="3.12.0", git_commit="abc123",
             timestamp=f"2025-01-01T00:00:{repeat:02d}", model_handle="random", seed=0, learning_rate=0.001)
    if status != "ok":
        r["error"] = "RuntimeError: boom"
        return r
    steady = total / 6 if steady is None else steady
    r.update(test_accuracy=acc, test_loss=0.5, data_prep_s=total / 10, first_epoch_s=steady * 2,
             steady_epoch_s=steady, steady_epoch_min_s=steady * 0.9, steady_epoch_max_s=steady * 1.1,
             total_s=total, train_img_s=train, end_to_end_img_s=train * 0.8, eval_img_s=train * 2,
             input_only_img_s=train * 10, model_only_img_s=train * 1.1, e2e_fraction_of_model=0.8 / 1.1,
             bottleneck="compute-bound", peak_rss_mb=rss, train_images=450, test_images=100_000,
             feature_pass_s=3.0 if name.startswith("featcache") else "")
    return r


CPU_ROWS = [
    row("naive", "cpu", 0.80, 100, 30, 3000, repeat=0),
    row("naive", "cpu", 0.82, 110, 28, 3100, repeat=1),
    row("naive-rgb", "cpu", 0.85, 98, 31, 3000),
    row("tfdata", "cpu", 0.90, 50, 200, 2000),
    row("tfdata-xla", "cpu", 0.905, 40, 150, 1700),
    row("tfdata-mixed", "cpu", 0.90, 40, 160, 1800),  # ties tfdata-xla on total time
    row("featcache", "cpu", 0.88, 20, 500, 1500),  # fastest, but 2.5 points below the best
    row("tfdata-dct", "cpu", None, None, None, None, status="error"),
]
GPU_ROWS = [
    row("naive", "gpu", 0.81, 28, 100, 4000, repeat=0),
    row("naive", "gpu", 0.81, 32, 100, 4000, repeat=1),
    row("tfdata", "gpu", 0.90, 10, 900, 3000, repeat=0),
    row("tfdata", "gpu", 0.91, 12, 800, 3000, repeat=1),
    row("tfdata", "gpu", 0.92, 14, 700, 3000, repeat=2),
]


def write_csv(path, rows):
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, index=False)
    return path


@pytest.fixture
def csvs(tmp_path):
    cpu = write_csv(tmp_path / "cpu.csv", CPU_ROWS)
    # The GPU file also repeats one CPU row (a resumed run copied over): dropped as a duplicate.
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    gpu = write_csv(gpu_dir / "gpu.csv", GPU_ROWS + [CPU_ROWS[3]])
    return cpu, gpu


@pytest.fixture
def df(csvs):
    return load(list(csvs))


# --- recommend ------------------------------------------------------------------------------

def test_tie_on_total_time_is_broken_deterministically(df):
    row, reason, command = recommend(df, "cpu", max_acc_drop=1.0, objective="total-time")
    # tfdata-xla and tfdata-mixed both take 40 s; throughput breaks the tie (160 > 150 img/s).
    assert row["name"] == "tfdata-mixed"
    assert "tie" in reason.lower()
    assert "tfdata-mixed" in reason and "tfdata-xla" in reason
    # The shuffled input gives the same answer.
    again = recommend(df.sample(frac=1.0, random_state=3), "cpu", 1.0, "total-time")
    assert again[0]["name"] == "tfdata-mixed" and again[1] == reason
    assert command == ("python -m bench run --device cpu --configs tfdata-mixed --preset quick --dataset synthetic "
                       "--epochs 5 --batch-size 32 --num-images 600 --model-handle random")


def test_accuracy_filter_excludes_the_fastest(df):
    row, reason, _ = recommend(df, "cpu", max_acc_drop=1.0)
    assert row["name"] != "featcache"  # 88.0% vs best 90.5%: more than 1 point below
    assert "featcache (88.0%)" in reason
    # Allow a 3-point drop and the fastest configuration wins, without a tie.
    row, reason, _ = recommend(df, "cpu", max_acc_drop=3.0)
    assert row["name"] == "featcache"
    assert "tie" not in reason.lower()


def test_objectives_throughput_and_memory(df):
    row, reason, _ = recommend(df, "cpu", objective="throughput")
    assert row["name"] == "tfdata"  # 200 img/s, the most among those within 1 point
    assert "throughput" in reason
    row, reason, _ = recommend(df, "cpu", objective="memory")
    assert row["name"] == "tfdata-xla"  # 1700 MB
    assert "memory" in reason


def test_gpu_uses_medians_over_repeats(df):
    row, _, command = recommend(df, "gpu")
    assert row["name"] == "tfdata"
    assert row["total_s"] == 12 and row["acc_pct"] == pytest.approx(91.0)
    assert "--device gpu --configs tfdata" in command


def test_missing_device_lists_devices_present(csvs):
    only_cpu = load(csvs[0])
    with pytest.raises(UserError) as err:
        recommend(only_cpu, "gpu")
    assert "gpu" in str(err.value) and "devices present: cpu" in str(err.value)


def test_recommend_cli(csvs, capsys):
    assert bench_cli.main(["recommend", "--device", "cpu", "--objective", "memory", str(csvs[0])]) == 0
    out = capsys.readouterr().out
    assert "recommended: tfdata-xla" in out and "python -m bench run --device cpu --configs tfdata-xla" in out
    code = bench_cli.main(["recommend", "--device", "gpu", str(csvs[0])])
    assert code == UserError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "devices present: cpu" in err[0]


# --- report ---------------------------------------------------------------------------------

def test_merge_gives_one_table_per_device(csvs, df):
    assert len(df) == len(CPU_ROWS) + len(GPU_ROWS)  # the duplicated CPU row was dropped
    tables = summarise(df)
    assert list(tables) == ["cpu", "gpu"]
    cpu, gpu = tables["cpu"], tables["gpu"]
    assert list(cpu.index) == ["naive", "naive-rgb", "tfdata", "tfdata-dct", "tfdata-mixed", "tfdata-xla",
                               "featcache"]
    assert list(gpu.index) == ["naive", "tfdata"]
    for device, table in tables.items():
        header = table.attrs["header"]
        for part in (f"device {device}", "synthetic", "weights random", "TF 2.99.0", "img/s", "MB"):
            assert part in header
    assert "Test GPU H0" in gpu.attrs["header"]
    assert cpu.loc["tfdata-dct", "errors"] == 1 and cpu.loc["tfdata-dct", "ok"] == 0
    assert math.isnan(cpu.loc["tfdata-dct", "total s"])
    assert cpu.loc["naive", "ok"] == 2 and cpu.loc["naive", "channels"] == "BGR"
    assert gpu.loc["tfdata", "acc min–max"] == "90.0–92.0"


def test_speedup_vs_naive(df):
    tables = summarise(df)
    cpu, gpu = tables["cpu"], tables["gpu"]
    assert cpu.loc["naive", "total s"] == 105  # median of 100 and 110
    assert cpu.loc["tfdata", "speed-up vs naive"] == pytest.approx(105 / 50)
    assert cpu.loc["featcache", "speed-up vs naive"] == pytest.approx(105 / 20)
    assert cpu.loc["naive", "speed-up vs naive"] == pytest.approx(1.0)
    assert gpu.loc["tfdata", "speed-up vs naive"] == pytest.approx(30 / 12)  # medians, same device
    # No naive row on a device: blank.
    no_naive = summarise(df[df["name"] != "naive"])
    assert no_naive["gpu"]["speed-up vs naive"].isna().all()


def test_rgb_gain_line(df):
    tables = summarise(df)
    notes = "\n".join(tables["cpu"].attrs["notes"])
    assert "RGB fix" in notes and "+4.0 percentage points" in notes  # 85.0% vs median 81.0%
    assert "RGB fix" not in "\n".join(tables["gpu"].attrs["notes"])  # no naive-rgb on the GPU
    text = render_console(tables)
    assert "RGB fix" in text and "tfdata-mixed" in text
    md = render_markdown(tables)
    assert "| config |" in md and "|---|" in md.replace("---:", "---") and "## gpu" in md


def test_medians_keep_settings(df):
    med = medians(df).set_index(["device", "name"])
    assert med.loc[("cpu", "naive"), "acc_pct"] == pytest.approx(81.0)
    assert med.loc[("gpu", "tfdata"), "n_ok"] == 3


def test_bad_input_names_the_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="nope.csv"):
        load(missing)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"wrong.csv.*missing columns"):
        load(wrong)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.csv"):
        load(empty)


def test_report_cli_markdown_and_plots(csvs, tmp_path, capsys):
    md = tmp_path / "out" / "report.md"
    assert bench_cli.main(["report", str(csvs[0]), str(csvs[1]), "--markdown", str(md), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "device cpu" in out and "device gpu" in out and "RGB fix" in out
    assert md.read_text().startswith("# Benchmark results")
    for kind in ("time", "accuracy", "stages"):  # beside the first CSV, one set per machine and run
        pngs = list(csvs[0].parent.glob(f"cpu-*{kind}.png"))
        assert len(pngs) == 2 and all(p.stat().st_size > 5000 for p in pngs), kind
    assert "![" in md.read_text() and ".png)" in md.read_text()
    code = bench_cli.main(["report", str(tmp_path / "missing.csv")])
    assert code == DataError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.csv" in err[0]


def test_write_plots(df, tmp_path):
    paths = write_plots(df, tmp_path / "plots", "run")
    assert [p.name for p in paths] == ["run-time.png", "run-accuracy.png", "run-stages.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert write_plots(df[df["status"] != "ok"], tmp_path / "none") == []


def test_recommend_treats_gaps_below_test_set_noise_as_ties():
    import pandas as pd

    from bench.recommend import recommend

    rows = [dict(name="naive", device="cpu", status="ok", test_accuracy=1.0, total_s=26.0, train_img_s=110.0,
                 steady_epoch_s=4.0, peak_rss_mb=2800.0, test_images=150, repeat=0),
            dict(name="featcache", device="cpu", status="ok", test_accuracy=0.98, total_s=8.0, train_img_s=9e3,
                 steady_epoch_s=0.02, peak_rss_mb=3100.0, test_images=150, repeat=0)]
    df = pd.DataFrame(rows)
    row, reason, _ = recommend(df, "cpu", max_acc_drop=1.0)
    assert row["name"] == "featcache" and "150 test images" in reason
    row, _, _ = recommend(df, "cpu", max_acc_drop=1.0, noise_margin=False)
    assert row["name"] == "naive"
    big = df.assign(test_images=100_000)  # a huge test set resolves a 2-point gap
    row, _, _ = recommend(big, "cpu", max_acc_drop=1.0)
    assert row["name"] == "naive"


# --- issue 19: rows measured on different data or weights are kept apart ----------------------

def data_run(path, run_id, scale=1.0, **data):
    """A CPU run of naive, tfdata and featcache on the data ``data`` describes (extra columns kept)."""
    rows = [row(n, "cpu", acc, total * scale, train, rss) | {"run_id": run_id, **data}
            for n, acc, total, train, rss in (("naive", 0.80, 100, 30, 3000), ("tfdata", 0.90, 50, 200, 2000),
                                              ("featcache", 0.895, 20, 500, 1500))]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


SYNTHETIC = dict(dataset="synthetic", num_images=600, data_files=600, data_fingerprint="aaaaaaaaaaaa")
FOLDER = dict(dataset="flowers", data_dir="d", num_images=21, data_files=21, data_fingerprint="bbbbbbbbbbbb",
              train_images=15, test_images=6)


def bench_run_accepts(command: str) -> None:
    """``command`` (a printed ``bench run`` line) as bench run's own parser and checks take it."""
    import shlex

    from bench import run as bench_run

    argv = shlex.split(command)
    args = bench_cli.build_parser().parse_args(argv[argv.index("run"):])
    bench_run.sweep_configs(args)  # the checks across flags (e.g. --dataset with --data-dir) raise here


def test_recommend_keeps_runs_on_different_data_apart(tmp_path, capsys):
    a = data_run(tmp_path / "a.csv", "A", **SYNTHETIC)
    b = data_run(tmp_path / "b.csv", "B", scale=3.0, **FOLDER)
    assert bench_cli.main(["recommend", "--device", "cpu", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.count("== ") == 2 and out.count("recommended: featcache") == 2
    # Each recommendation is its own run's medians, not a pool of both (20 s here, 60 s there).
    assert "(20 s)" in out and "(60 s)" in out
    commands = [line.strip() for line in out.splitlines() if line.startswith("  python -m bench run")]
    assert len(commands) == 2
    assert "--dataset synthetic" in commands[0] and "--data-dir" not in commands[0]
    assert "--data-dir d" in commands[1] and "--dataset" not in commands[1]
    for command in commands:
        bench_run_accepts(command)


def test_reproduce_command_of_mixed_settings_is_one_bench_run_accepts():
    from bench.recommend import command_for

    # What pooling two runs gave: the first run's dataset and the second's data folder.
    command = command_for(pd.Series(dict(name="tfdata", preset="smoke", dataset="synthetic", data_dir="d", epochs=2,
                                         batch_size=32, num_images=40, model_handle="random")), "cpu")
    assert "--dataset" not in command and "--num-images" not in command
    bench_run_accepts(command)
    with pytest.raises(UserError, match="--data-dir"):  # the check the old command failed
        bench_run_accepts(command + " --dataset synthetic")


def test_compare_says_when_the_runs_used_different_data(tmp_path, capsys):
    a = data_run(tmp_path / "a.csv", "A", **SYNTHETIC)
    b = data_run(tmp_path / "b.csv", "B", **FOLDER)
    assert bench_cli.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "note: BASE and NEW were measured on different data" in out and "from d, 21 images" in out
    verdicts = [line for line in out.splitlines() if line.startswith("   cpu") or line.startswith("cpu")]
    assert len(verdicts) == 3 and all("different data: dataset synthetic vs flowers" in v for v in verdicts)
    # The same data on both sides: no such note.
    c = data_run(tmp_path / "c.csv", "C", **SYNTHETIC)
    assert bench_cli.main(["compare", str(a), str(c)]) == 0
    assert "different data" not in capsys.readouterr().out


def test_one_run_with_rows_on_two_data_sets_is_two_reports(tmp_path):
    """What --resume made of a run whose data folder changed before issue 19: one run_id, rows on
    40 images and rows on 21 (older rows: counts only), a modelonly probe and a failed row."""
    from bench.report import build

    old = dict(dataset="flowers", data_dir="d", num_images=40, train_images=30, test_images=10)
    rows = [row("naive", "cpu", 0.8, 100, 30, 3000) | old, row("tfdata", "cpu", 0.9, 50, 200, 2000) | old,
            row("tfdata", "cpu", 0.7, 20, 200, 2000, repeat=1) | dict(old, train_images=15, test_images=6),
            row("tfdata-dct", "cpu", None, None, None, None, status="error") | dict(dataset="flowers", data_dir="d")]
    rows.append(row("tfdata", "cpu", 0.0, 0, 900, 2000) | dict(name="modelonly", pipeline="modelonly",
                                                                dataset="in-memory", test_accuracy=""))
    path = tmp_path / "mixed.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    reports = build(load(path))
    assert len(reports) == 2
    assert "data flowers from d, 40 images" in reports[0].label and "21 images" in reports[1].label
    assert reports[0].tables["cpu"].loc["tfdata", "ok"] == 1 and reports[1].tables["cpu"].loc["tfdata", "ok"] == 1
    for r in reports:  # the rows whose data is unknown or none go with both
        assert {"modelonly", "tfdata-dct"} <= set(r.tables["cpu"].index)
    assert "naive" not in reports[1].tables["cpu"].index


def test_markdown_says_the_images_used_not_the_images_requested(tmp_path):
    """Issue 19: a smoke run (--num-images 40) on a data folder of 21 said "40 images requested"."""
    path = data_run(tmp_path / "d.csv", "D", **(FOLDER | dict(num_images=40, data_files="")))
    md = tmp_path / "d.md"
    assert bench_cli.main(["report", str(path), "--markdown", str(md)]) == 0
    data_line = next(line for line in md.read_text().splitlines() if line.startswith("| data |"))
    assert "21 images" in data_line and "15 train / 6 test" in data_line and "40" not in data_line


def test_int8_notes_say_what_quantizing_cost_and_when_the_store_served():
    from bench.report import int8_notes

    def int8(name, repeat, seconds, reused):
        r = row("featcache", "cpu", 0.9, 20 + seconds, 500, 1500, repeat=repeat)
        return dict(r, name=name, quantize_s=seconds, quantized_reused=reused)

    df = pd.DataFrame([int8("featcache-ov-int8", 0, 10.0, False), int8("featcache-ov-int8", 1, 12.0, False),
                       int8("featcache-ov-int8-stored", 0, 11.0, False),
                       int8("featcache-ov-int8-stored", 1, 0.05, True), row("featcache", "cpu", 0.9, 20, 500, 1500)])
    notes = int8_notes(df)
    assert notes[0] == "featcache-ov-int8: 11.0 s of total s calibrating and quantizing (NNCF)"
    assert notes[1].startswith("featcache-ov-int8-stored: 11.0 s")
    assert "1 of 2 repeats loaded it from the store" in notes[1]
    stored = int8_notes(df[(df["name"] != "featcache-ov-int8-stored") | (df["repeat"] == 1)])
    assert "int8 model loaded from the store in 1 of 1 repeats (0.05 s)" in stored[1]
    assert int8_notes(df[df["name"] == "featcache"]) == [] and int8_notes(df.drop(columns="quantize_s")) == []


def test_plot_subtitles_name_the_cpu_and_its_isa_flags():
    from bench.plots import _subtitle

    rows = pd.DataFrame([dict(row("tfdata", "cpu", 0.9, 50, 200, 2000), cpu_brand="AMD EPYC", cpu_logical_cores="2.0",
                              cpu_isa="avx2 fma avx512f avx512_vnni avx512_bf16")])
    assert _subtitle(rows).splitlines()[-1] == "CPU AMD EPYC, 2 cores: avx2 fma avx512f avx512_vnni avx512_bf16"
    assert "CPU" not in _subtitle(rows.drop(columns="cpu_isa"))  # rows from before machine facts
