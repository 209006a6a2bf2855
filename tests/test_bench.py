"""The sweep: CSV validity, isolation of failures, kill/resume, Ctrl-C, and user mistakes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench import run as bench_run
from flowers_fast.config import RunConfig
from flowers_fast.errors import OutputError

ROOT = Path(__file__).resolve().parents[1]


def bench(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def keys(df):
    return sorted(zip(df["name"], df["device"], df["repeat"]))


@pytest.mark.slow
def test_smoke_sweep_writes_one_valid_csv(tmp_path, small_model):
    res = bench("run", "--preset", "smoke", "--configs", "naive,tfdata", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    runs = list(tmp_path.glob("run-*.csv"))
    assert len(runs) == 1
    df = pd.read_csv(runs[0])
    assert keys(df) == [("naive", "cpu", 0), ("tfdata", "cpu", 0)]
    assert set(df["status"]) == {"ok"}
    for column in ("test_accuracy", "steady_epoch_s", "train_img_s", "peak_rss_mb", "data_prep_s", "device_name",
                   "tf_version", "git_commit", "weights", "compute_dtype", "bottleneck", "model_only_img_s"):
        assert column in df.columns and df[column].notna().all(), column
    assert (df["weights"] == "random").all() and (df["dataset"] == "synthetic").all()
    # Machine facts in every row, the per-machine measurements with when they were taken.
    for column in ("machine_id", "cpu_brand", "cpu_isa", "cpu_logical_cores", "ram_gb", "os", "gpu_names",
                   "tensorflow_version", "tf_keras_version", "numpy_version", "opencv_version", "tf_cuda_build",
                   "matmul_peak_measured", "repeats"):
        assert column in df.columns and df[column].notna().all(), column
    assert df["machine_id"].nunique() == 1
    assert pd.read_csv(tmp_path / "latest.csv").equals(df)
    assert "speed-up" in res.stdout
    # The report beside the CSV: Markdown linking the plots, one self-contained HTML file.
    stem = runs[0].with_suffix("")
    for kind in ("time", "accuracy", "stages"):
        assert Path(f"{stem}-{kind}.png").stat().st_size > 5000, kind
    md = runs[0].with_suffix(".md").read_text()
    assert f"]({stem.name}-time.png)" in md and "Recommended on cpu" in md
    page = runs[0].with_suffix(".html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "http://" not in page.split("<body>")[0]


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_gives_a_two_replica_row(tmp_path, small_model):
    res = bench("run", "--preset", "smoke", "--configs", "tfdata", "--strategy", "mirrored", "--logical-cpus", "2",
                "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(tmp_path / "latest.csv")
    assert df["status"].tolist() == ["ok"]
    assert df["replicas"].tolist() == [2] and df["global_batch"].tolist() == [64]
    assert df["strategy"].tolist() == ["mirrored"] and df["logical_cpus"].tolist() == [2]


def test_timeout_becomes_a_row_and_the_sweep_goes_on(tmp_path):
    res = bench("run", "--preset", "smoke", "--configs", "naive,tfdata", "--timeout", "2", "--out", str(tmp_path))
    assert res.returncode == 9
    df = pd.read_csv(tmp_path / "latest.csv")
    assert list(df["status"]) == ["timeout", "timeout"]
    assert df["error"].str.contains("--timeout").all()


@pytest.mark.parametrize("mode,expect", [("crash", "killed (out of memory?)"), ("raise", "without a result")])
def test_worker_crash_becomes_an_error_row(tmp_path, mode, expect):
    env = dict(os.environ, FAKE_WORKER_MODE=mode, PYTHONPATH=str(Path(__file__).parent))
    row = bench_run.run_one(RunConfig(), 60, tmp_path / "w.log", env, worker="fake_worker")
    assert row["status"] == "error" and expect in row["error"]


def test_hanging_worker_is_killed_at_the_timeout(tmp_path):
    env = dict(os.environ, FAKE_WORKER_MODE="hang", PYTHONPATH=str(Path(__file__).parent))
    start = time.monotonic()
    row = bench_run.run_one(RunConfig(), 2, tmp_path / "w.log", env, worker="fake_worker")
    assert row["status"] == "timeout" and time.monotonic() - start < 30


def _start_sweep(out, *extra):
    # SIGINT is ignored in background jobs of non-interactive shells (a CI script's); a Ctrl-C is not.
    return subprocess.Popen([sys.executable, "-m", "bench", "run", "--preset", "smoke", "--out", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_rows(out, n, proc, limit=300):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        latest = out / "latest.csv"
        if latest.exists() and len(pd.read_csv(latest)) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.5)
    raise AssertionError("sweep made no progress")


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_rows(tmp_path, small_model):
    configs = "naive,featcache"
    proc = _start_sweep(tmp_path, "--configs", configs)
    _wait_rows(tmp_path, 1, proc)
    time.sleep(3)  # now inside the second (and last) configuration
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = pd.read_csv(tmp_path / "latest.csv")
    assert len(killed) == 1 and set(killed["status"]) == {"ok"}  # only complete rows
    res = bench("run", "--resume", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    runs = list(tmp_path.glob("run-*.csv"))
    assert len(runs) == 1  # resume continues the same file
    df = pd.read_csv(runs[0])
    assert keys(df) == sorted([(c, "cpu", 0) for c in configs.split(",")])
    assert set(df["status"]) == {"ok"}


@pytest.mark.slow
def test_ctrl_c_keeps_finished_rows_marks_the_running_one_and_exits_130(tmp_path, small_model):
    proc = _start_sweep(tmp_path, "--configs", "naive,tfdata")
    _wait_rows(tmp_path, 1, proc)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    df = pd.read_csv(tmp_path / "latest.csv")
    assert list(df["status"]) == ["ok", "interrupted"]
    assert "--resume" in err and "Traceback" not in err


def test_second_run_writes_a_new_file(tmp_path):
    (tmp_path / "run-x.csv").write_text("a\n1\n")
    first = bench_run.new_run_path(tmp_path)[1]
    first.write_text("a\n1\n")
    (first.with_suffix(".json")).write_text("{}")
    second = bench_run.new_run_path(tmp_path)[1]
    assert first != second and not second.exists()


def test_results_file_survives_a_full_disk(tmp_path, monkeypatch):
    results = bench_run.ResultsFile(tmp_path / "run.csv", tmp_path / "latest.csv")
    results.add({"name": "naive", "device": "cpu", "repeat": 0, "status": "ok"})
    before = (tmp_path / "run.csv").read_text()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(OutputError, match="run.csv.*No space left"):
        results.add({"name": "tfdata", "device": "cpu", "repeat": 0, "status": "ok"})
    assert (tmp_path / "run.csv").read_text() == before  # the finished row is not lost
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("args,code,needle", [
    (["run", "--configs", "nope"], 2, "--configs: unknown configuration nope"),
    (["run", "--batch-size", "0"], 2, "--batch-size"),
    (["run", "--epochs", "-1"], 2, "--epochs"),
    (["run", "--device", "gpu"], 7, "--device gpu"),
    (["run", "--resume"], 2, "--resume"),
])
def test_user_mistakes_are_one_line_with_distinct_codes(tmp_path, args, code, needle):
    res = bench(*args, "--out", str(tmp_path / "empty"), env={"CUDA_VISIBLE_DEVICES": "-1"})
    assert res.returncode == code, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())  # nothing written


def test_unwritable_out_is_exit_8(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = bench("run", "--configs", "naive", "--out", str(blocker / "results"))
    assert res.returncode == 8 and "--out" in res.stderr and "Traceback" not in res.stderr


def test_list_names_every_configuration():
    res = bench("list")
    assert res.returncode == 0
    for name in ("naive", "tutorial", "tfdata", "tfdata-mixed", "tfdata-xla", "tfdata-mixed-xla", "featcache"):
        assert f"  {name} " in res.stdout


@pytest.mark.slow
def test_gpu_check_script_cpu_fallback(tmp_path, small_model):
    res = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path), "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = (tmp_path / "gpu_check.txt").read_text()
    assert "PASS  tfdata-mixed: backbone convolutions run in bfloat16" in report
    assert "PASS  every configuration finished" in report
    assert "mixed precision model-only >= 1.5x fp32" in report  # reported on CPU, judged on GPU


def test_sweep_from_python_is_bench_run(tmp_path):
    """bench.run.sweep builds the namespace bench run's parser builds and goes through the same
    execute: the same saved settings, rows and exit code (timeouts keep it fast)."""
    res = bench("run", "--preset", "smoke", "--configs", "naive,tfdata", "--timeout", "2", "--epochs", "1",
                "--out", str(tmp_path / "cli"))
    assert res.returncode == 9
    result = bench_run.sweep(configs=["naive", "tfdata"], preset="smoke", timeout=2, epochs=1,
                             out=tmp_path / "py", quiet=True)
    assert result.exit_code == 9 and result.csv.parent == tmp_path / "py" and "timeout" in result.output
    rows = result.rows()
    assert list(rows["status"]) == ["timeout", "timeout"] and set(rows["epochs"]) == {1}
    import json

    saved = [json.loads(next((tmp_path / d).glob("run-*.json")).read_text()) for d in ("cli", "py")]
    assert {k: v for k, v in saved[0].items() if k != "out"} == {k: v for k, v in saved[1].items() if k != "out"}


@pytest.mark.parametrize("kwargs,needle", [
    (dict(learning_rate_x=1), "'learning_rate_x' is not a setting"),
    (dict(pipeline="naive"), "'pipeline' is not a setting"),  # a configuration's, not the sweep's
    (dict(epochs=0), "--epochs must be a positive integer"),
    (dict(configs="nope"), "unknown configuration nope"),
    (dict(device="tpu"), "device 'tpu'"),
    (dict(repeats=0), "repeats must be a positive integer"),
])
def test_sweep_from_python_rejects_what_the_cli_rejects(tmp_path, kwargs, needle):
    from flowers_fast.errors import UserError

    with pytest.raises(UserError, match=needle):
        bench_run.sweep(preset="smoke", out=tmp_path, **kwargs)
    assert not list(tmp_path.glob("run-*"))  # nothing written


def test_resume_reads_a_skipped_row_as_done(tmp_path):
    """A worker's skipped row (e.g. OpenVINO bf16 on a CPU without bf16) is a finished row."""
    csv_path = tmp_path / "run-x.csv"
    csv_path.write_text("name,device,repeat,status,error\nfeatcache-ov-bf16,cpu,0,skipped,no native bf16\n")
    rows, cut = bench_run.read_rows(csv_path)
    assert not cut and [r["status"] for r in rows] == ["skipped"]
