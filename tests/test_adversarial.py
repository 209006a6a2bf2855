"""Adversarial inputs (issue 12): every bad input or fault a user can meet ends in one line that
names the file or flag, with the exit code README's Troubleshooting table lists, no traceback,
and no earlier result changed.

One table, one case per row: how to set the workspace up, the command line, the exit code, and
what the error line must name (and say). Commands run in this process through ``main(argv)``,
so most cases cost milliseconds and none starts TensorFlow anew; only the signal cases start a
sweep, because a signal needs a process to hit. A second table checks that odd image files (what
cameras and phones write) give every pipeline the same pixels.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench import cli as bench_cli
from bench import run as bench_run
from flowers_fast import cli as ff_cli
from flowers_fast import data, synthetic, train

ROOT = Path(__file__).resolve().parents[1]
SIZE = 96  # the session's offline model (conftest.small_model) is exported at this size
HEADER = ("run_id,preset,name,device,repeat,status,error,pipeline,test_accuracy,steady_epoch_s,total_s,"
          "train_img_s,peak_rss_mb\n")
ROW_OK = "A,smoke,naive,cpu,0,ok,,naive,0.9,1.5,10.0,30.0,900\n"
RUN_JSON = {"device": "cpu", "preset": "smoke", "configs": "naive", "repeats": None, "timeout": None,
            "figures": False, "out": "x"}


# --- the workspace: earlier results that no case may change, and input makers ----------------

def jpeg(path: Path, label: int = 0, seed: int = 0, exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(synthetic.render(label, np.random.default_rng([seed, label])))
    if exif_orientation is None:
        image.save(path, quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation  # EXIF Orientation, as phones write it
        image.save(path, quality=90, exif=exif.tobytes())
    return path


def folder(root: Path, classes=("daisy", "roses"), per_class: int = 4) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            jpeg(root / name / f"{i}.jpg", c, i)
    return root


def run_files(root: Path, csv_text: str | bytes | None = HEADER + ROW_OK, meta=RUN_JSON, name="run-1") -> Path:
    """A run's CSV and JSON under ``root`` as bench run writes them (or damaged); returns the CSV."""
    root.mkdir(parents=True, exist_ok=True)
    csv_path = root / f"{name}.csv"
    if csv_text is not None:
        csv_path.write_bytes(csv_text if isinstance(csv_text, bytes) else csv_text.encode())
    if meta is not None:
        (root / f"{name}.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return csv_path


@pytest.fixture
def ws(tmp_path, monkeypatch, cache):
    """A workspace holding earlier results (a finished run, a saved model, figures, notes), the
    current folder for the case; commands that would start a worker fail the test instead."""
    earlier = tmp_path / "results"
    run_files(earlier, name="run-20260101-000000")
    (earlier / "latest.csv").write_text(HEADER + ROW_OK)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"earlier model")
    (tmp_path / "model" / "classes.txt").write_text("daisy\nroses\n")
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "tfdata-confusion.csv").write_text("true,daisy\ndaisy,1\n")
    (tmp_path / "afile").write_text("a regular file, not a folder\n")
    (tmp_path / "emptydir").mkdir()
    jpeg(tmp_path / "good.jpg")
    monkeypatch.chdir(tmp_path)

    def no_worker(*args, **kwargs):
        raise AssertionError("a case started a sweep worker: the input was not rejected up front")

    def no_training(*args, **kwargs):
        raise AssertionError("a case started training: the input was not rejected up front")

    generate = synthetic.generate

    def small_sets_only(root, num_images, seed):
        assert num_images <= 100, "a case generated a full-size synthetic set: the input was not rejected"
        return generate(root, num_images, seed)

    monkeypatch.setattr(bench_run, "run_one", no_worker)
    monkeypatch.setattr(train, "_fit_evaluate", no_training)
    monkeypatch.setattr(synthetic, "generate", small_sets_only)
    return tmp_path


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def assert_unchanged(before: dict) -> None:
    for path, content in before.items():
        assert path.exists(), f"{path} was deleted"
        assert path.read_bytes() == content, f"{path} was changed"


# --- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple  # "{ws}" and "{model}" are filled in
    code: int
    names: str  # the flag or file the error line must name
    says: str = ""  # and, when given, what it must say
    setup: Callable | None = None  # setup(ws, monkeypatch)
    tool: str = "ff"  # ff: python -m flowers_fast; bench: python -m bench

    def __str__(self):
        return self.id


def _env(name, value):
    return lambda ws, mp: mp.setenv(name, value.format(ws=ws))


def _fs(*steps):
    def setup(ws, mp):
        for step in steps:
            step(ws, mp)
    return setup


def _write(rel: str, content: str | bytes = "x"):
    def step(ws, mp):
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return step


def _mkdir(rel: str):
    return lambda ws, mp: (ws / rel).mkdir(parents=True, exist_ok=True)


def _folder(rel: str, **kw):
    return lambda ws, mp: folder(ws / rel, **kw)


def _run(rel: str, csv_text=HEADER + ROW_OK, meta=RUN_JSON):
    return lambda ws, mp: run_files(ws / rel, csv_text, meta)


def _split_part_undecodable(rel: str, part: str = "test", name: str | None = None):
    """The images that land in ``part`` of the one seeded split become text files."""
    def step(ws, mp):
        root = folder(ws / rel)
        s = data.split(data.discover(root), 0.25, 0)
        for f in (s.test_files if part == "test" else s.train_files):
            Path(f).write_text("not an image\n")
            if name:
                Path(f).rename(Path(f).with_name(name))
                break
    return step


def _damaged_synthetic_cache(ws, mp):
    cache = ws / "cache"
    mp.setenv("FLOWERS_FAST_CACHE", str(cache))
    root = synthetic.generate(synthetic.default_root(cache, 10, 0), 10, 0)
    for f in (root / "tulips").iterdir():
        f.unlink()
    (root / "tulips").rmdir()  # a class lost since the set was built


def _damaged_model_cache(ws, mp):
    from flowers_fast import hubexport

    cache = ws / "cache"
    mp.setenv("FLOWERS_FAST_CACHE", str(cache))
    path = hubexport.default_path(cache, 0, SIZE)
    path.mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"cut short")  # a killed copy


def _full_disk(ws, mp):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(os, "fsync", full)
    mp.setattr(Path, "write_text", full)
    mp.setattr(Path, "write_bytes", full)


def _no_tf_config(ws, mp):
    mp.delenv("TF_CONFIG", raising=False)


T = ("train", "--image-size", str(SIZE), "--epochs", "1", "--quiet", "--model-handle", "{model}")
TD = T + ("--data-dir",)  # + a folder
RESULTS = "{ws}/results/run-20260101-000000.csv"

CASES = [
    # --- flags: every number finite and in range, text not empty, combinations that mean nothing
    Case("lr-nan", ("train", "--learning-rate", "nan"), 2, "--learning-rate"),
    Case("lr-inf", ("train", "--learning-rate", "inf"), 2, "--learning-rate"),
    Case("lr-zero", ("train", "--learning-rate", "0"), 2, "--learning-rate"),
    Case("test-fraction-nan", ("train", "--test-fraction", "nan"), 2, "--test-fraction"),
    Case("test-fraction-one", ("train", "--test-fraction", "1"), 2, "--test-fraction"),
    Case("seed-negative", ("train", "--seed", "-1"), 2, "--seed"),
    Case("seed-too-big", ("train", "--seed", str(2**32)), 2, "--seed"),
    Case("num-images-below-classes", ("train", "--num-images", "3"), 2, "--num-images"),
    Case("image-size-tiny", ("train", "--image-size", "16"), 2, "--image-size"),
    Case("image-size-huge", ("train", "--image-size", "100000"), 2, "--image-size"),
    Case("epochs-zero", ("train", "--epochs", "0"), 2, "--epochs"),
    Case("batch-negative", ("train", "--batch-size", "-4"), 2, "--batch-size"),
    Case("data-dir-empty-text", ("train", "--data-dir", ""), 2, "--data-dir"),
    Case("model-handle-blank", ("train", "--model-handle", " "), 2, "--model-handle"),
    Case("data-service-malformed", ("train", "--data-service", "localhost"), 2, "--data-service"),
    Case("data-service-naive", ("train", "--pipeline", "naive", "--data-service", "grpc://localhost:5050"), 2,
         "--data-service"),
    Case("data-dir-and-other-dataset", ("train", "--dataset", "tfds", "--data-dir", "{ws}/d"), 2, "--data-dir",
         setup=_folder("d")),
    Case("featcache-fine-tune", ("train", "--pipeline", "featcache", "--fine-tune"), 2, "--fine-tune"),
    Case("modelonly-save", ("train", "--pipeline", "modelonly", "--save", "{ws}/m2"), 2, "--save"),
    Case("multiworker-without-tf-config", T + ("--strategy", "multiworker", "--num-images", "10"), 2, "TF_CONFIG",
         setup=_no_tf_config),
    Case("sweep-configs-comma", ("run", "--configs", ","), 2, "--configs", tool="bench"),
    Case("sweep-configs-twice", ("run", "--configs", "naive,naive"), 2, "--configs", "--repeats", tool="bench"),
    Case("sweep-configs-unknown", ("run", "--configs", "nope"), 2, "--configs", tool="bench"),
    Case("sweep-repeats-zero", ("run", "--repeats", "0"), 2, "--repeats", tool="bench"),
    Case("sweep-timeout-text", ("run", "--timeout", "soon"), 2, "--timeout", tool="bench"),
    Case("sweep-lr-minus-inf", ("run", "--learning-rate", "-inf"), 2, "--learning-rate", tool="bench"),
    Case("sweep-data-service-malformed", ("run", "--configs", "tfdata", "--data-service", "h"), 2, "--data-service",
         tool="bench"),
    Case("recommend-drop-inf", ("recommend", "--device", "cpu", "--max-acc-drop", "inf", RESULTS), 2,
         "--max-acc-drop", tool="bench"),
    Case("recommend-drop-negative", ("recommend", "--device", "cpu", "--max-acc-drop", "-1", RESULTS), 2,
         "--max-acc-drop", tool="bench"),
    Case("export-seed-negative", ("export-model", "{ws}/x", "--seed", "-1"), 2, "--seed"),
    Case("export-size-tiny", ("export-model", "{ws}/x", "--image-size", "3"), 2, "--image-size"),

    # --- output paths: checked before any long work, nothing the user has is overwritten
    Case("save-under-a-file", ("train", "--num-images", "20", "--save", "{ws}/afile/m"), 8, "--save"),
    Case("save-over-a-model", ("train", "--save", "{ws}/model"), 8, "--save", "not empty"),
    Case("figures-a-file", ("train", "--figures", "{ws}/afile"), 8, "--figures"),
    Case("figures-over-figures", ("train", "--figures", "{ws}/figs"), 8, "--figures", "tfdata-confusion.csv"),
    Case("save-and-figures-one-folder", ("train", "--save", "{ws}/same", "--figures", "{ws}/same"), 2, "--figures"),
    Case("out-under-a-file", ("run", "--configs", "naive", "--out", "{ws}/afile/x"), 8, "--out", tool="bench"),
    Case("out-latest-is-a-folder", ("run", "--configs", "naive", "--out", "{ws}/o"), 8, "--out", "latest.csv",
         setup=_mkdir("o/latest.csv"), tool="bench"),
    Case("out-logs-is-a-file", ("run", "--configs", "naive", "--out", "{ws}/o"), 8, "--out", "logs",
         setup=_write("o/logs"), tool="bench"),
    Case("out-full-disk-at-start", ("run", "--configs", "naive", "--out", "{ws}/full"), 8, "{ws}/full",
         "free disk space", setup=_full_disk, tool="bench"),
    Case("export-over-a-file", ("export-model", "{ws}/afile"), 8, "{ws}/afile"),
    Case("export-over-a-model", ("export-model", "{ws}/model"), 8, "{ws}/model"),
    Case("markdown-a-folder", ("report", RESULTS, "--markdown", "{ws}/emptydir"), 8, "--markdown", tool="bench"),
    Case("markdown-over-its-csv", ("report", RESULTS, "--markdown", RESULTS), 8, "--markdown", tool="bench"),

    # --- resume inputs: whatever the run files hold, one line naming them
    Case("resume-empty-csv", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.csv", setup=_run("r", ""),
         tool="bench"),
    Case("resume-no-repeat-column", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.csv", "repeat",
         setup=_run("r", "name,device,status\nnaive,cpu,ok\n"), tool="bench"),
    Case("resume-repeat-not-a-number", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.csv", "repeat",
         setup=_run("r", HEADER + ROW_OK.replace(",0,ok", ",x,ok")), tool="bench"),
    Case("resume-unknown-status", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.csv", "status",
         setup=_run("r", HEADER + ROW_OK.replace(",0,ok", ",0,great")), tool="bench"),
    Case("resume-binary-csv", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.csv",
         setup=_run("r", b"\x89PNG\r\n\x1a\n\x00\xff" * 40), tool="bench"),
    Case("resume-row-with-extra-fields", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.csv",
         setup=_run("r", HEADER + ROW_OK.replace("\n", ",extra\n") + ROW_OK), tool="bench"),
    Case("resume-empty-json", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.json",
         setup=_run("r", meta=""), tool="bench"),
    Case("resume-json-list", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.json",
         setup=_run("r", meta="[1, 2]"), tool="bench"),
    Case("resume-json-cut", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.json",
         setup=_run("r", meta='{"device": "cpu", "pres'), tool="bench"),
    Case("resume-json-bad-preset", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.json",
         setup=_run("r", meta={**RUN_JSON, "preset": "huge"}), tool="bench"),
    Case("resume-json-unknown-setting", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.json",
         setup=_run("r", meta={**RUN_JSON, "colour": "red"}), tool="bench"),
    Case("resume-json-bad-knob", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.json", "--epochs",
         setup=_run("r", meta={**RUN_JSON, "epochs": 0}), tool="bench"),
    Case("resume-json-gone-config", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "{ws}/r/run-1.json",
         setup=_run("r", meta={**RUN_JSON, "configs": "naive-old"}), tool="bench"),
    Case("resume-latest-empty-json", ("run", "--resume", "--out", "{ws}/r"), 3, "{ws}/r/run-1.json",
         setup=_run("r", meta=""), tool="bench"),
    Case("resume-a-folder", ("run", "--resume", "{ws}/results"), 2, "--resume", tool="bench"),
    Case("resume-missing", ("run", "--resume", "{ws}/nope.csv"), 2, "--resume", tool="bench"),
    Case("resume-latest-csv", ("run", "--resume", "{ws}/results/latest.csv"), 2, "--resume", "run-*.csv",
         tool="bench"),
    Case("resume-nothing-to-resume", ("run", "--resume", "--out", "{ws}/emptydir"), 2, "--resume", tool="bench"),
    Case("resume-with-another-epochs", ("run", "--resume", "{ws}/r/run-1.csv", "--epochs", "3"), 2, "--epochs",
         setup=_run("r"), tool="bench"),
    Case("resume-with-another-out", ("run", "--resume", "{ws}/r/run-1.csv", "--out", "{ws}/elsewhere"), 2, "--out",
         setup=_run("r"), tool="bench"),

    # --- report / recommend inputs
    Case("report-missing", ("report", "{ws}/nope.csv"), 3, "{ws}/nope.csv", tool="bench"),
    Case("report-a-folder", ("report", "{ws}/results"), 3, "{ws}/results", tool="bench"),
    Case("report-empty", ("report", "{ws}/e.csv"), 3, "{ws}/e.csv", setup=_write("e.csv", ""), tool="bench"),
    Case("report-binary", ("report", "{ws}/b.csv"), 3, "{ws}/b.csv", setup=_write("b.csv", b"\xff\xfe\x00" * 99),
         tool="bench"),
    Case("report-header-only-plot", ("report", "{ws}/h.csv", "--plot"), 3, "{ws}/h.csv",
         setup=_write("h.csv", HEADER), tool="bench"),
    Case("report-not-results", ("report", "{ws}/n.csv"), 3, "{ws}/n.csv", "missing column",
         setup=_write("n.csv", "a,b\n1,2\n"), tool="bench"),
    Case("recommend-device-absent", ("recommend", "--device", "gpu", RESULTS), 2, "--device gpu", tool="bench"),
    Case("recommend-nothing-finished", ("recommend", "--device", "cpu", "{ws}/f.csv"), 3, "--device cpu",
         setup=_write("f.csv", HEADER + ROW_OK.replace(",ok,", ",error,")), tool="bench"),

    # --- predict inputs (images are decoded before any model loads)
    Case("predict-missing", ("predict", "{ws}/nope.jpg"), 3, "{ws}/nope.jpg"),
    Case("predict-a-folder", ("predict", "{ws}/emptydir"), 3, "{ws}/emptydir"),
    Case("predict-zero-bytes", ("predict", "{ws}/z.jpg"), 3, "{ws}/z.jpg", setup=_write("z.jpg", b"")),
    Case("predict-text", ("predict", "{ws}/t.jpg"), 3, "{ws}/t.jpg", setup=_write("t.jpg", "hello\n")),
    Case("predict-heic-named-jpg", ("predict", "{ws}/h.jpg"), 3, "{ws}/h.jpg",
         setup=_write("h.jpg", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x07" * 500)),
    Case("predict-top-zero", ("predict", "{ws}/good.jpg", "--top", "0"), 2, "--top"),
    Case("predict-checkpoint-missing", ("predict", "{ws}/good.jpg", "--checkpoint", "{ws}/nope"), 4,
         "--checkpoint"),
    Case("predict-checkpoint-not-a-model", ("predict", "{ws}/good.jpg", "--checkpoint", "{ws}/emptydir"), 4,
         "--checkpoint"),
    Case("predict-handle-missing", ("predict", "{ws}/good.jpg", "--model-handle", "{ws}/nope"), 4,
         "--model-handle"),
    Case("predict-cache-a-file", ("predict", "{ws}/good.jpg", "--cache-dir", "{ws}/afile"), 8, "--cache-dir"),

    # --- model handles
    Case("handle-missing", T[:-1] + ("{ws}/nope", "--num-images", "10"), 4, "--model-handle"),
    Case("handle-empty-folder", T[:-1] + ("{ws}/emptydir", "--num-images", "10"), 4, "--model-handle",
         "saved_model.pb"),
    Case("handle-garbage-savedmodel", T[:-1] + ("{ws}/model", "--num-images", "10"), 4, "--model-handle"),
    Case("handle-url-offline", T[:-1] + ("http://127.0.0.1:9/model", "--num-images", "10"), 6, "--model-handle"),
    Case("handle-random-damaged-cache", T[:-1] + ("random", "--num-images", "10"), 4, "--model-handle random",
         "delete", setup=_damaged_model_cache),

    # --- caches
    Case("cache-dir-a-file", ("train", "--cache-dir", "{ws}/afile"), 8, "--cache-dir"),
    Case("cache-env-a-file", ("train",), 8, "FLOWERS_FAST_CACHE", setup=_env("FLOWERS_FAST_CACHE", "{ws}/afile")),
    Case("synthetic-cache-damaged", T + ("--num-images", "10"), 3, "{ws}/cache", "delete",
         setup=_damaged_synthetic_cache),
    Case("synthetic-cache-full-disk", T + ("--num-images", "10"), 8, "{ws}/cache",
         setup=_fs(_env("FLOWERS_FAST_CACHE", "{ws}/cache"), _full_disk)),

    # --- data folders
    Case("data-dir-missing", TD + ("{ws}/nope",), 3, "--data-dir"),
    Case("data-dir-a-file", TD + ("{ws}/afile",), 3, "--data-dir"),
    Case("data-dir-empty", TD + ("{ws}/emptydir",), 3, "--data-dir"),
    Case("data-dir-one-class", TD + ("{ws}/d",), 3, "--data-dir", setup=_folder("d", classes=("daisy",))),
    Case("data-dir-one-level-too-high", TD + ("{ws}/w",), 3, "--data-dir", "{ws}/w/flower_photos",
         setup=_folder("w/flower_photos")),
    Case("data-dir-one-level-too-deep", TD + ("{ws}/d/daisy",), 3, "--data-dir", "({ws}/d)",
         setup=_folder("d")),
    Case("data-dir-class-without-images", TD + ("{ws}/d",), 3, "--data-dir", "tulips",
         setup=_fs(_folder("d"), _write("d/tulips/readme.txt"))),
    Case("data-too-few-to-split", TD + ("{ws}/d", "--test-fraction", "0.9"), 3, "--test-fraction",
         setup=_folder("d", per_class=1)),
    Case("test-split-undecodable-naive", TD + ("{ws}/d", "--pipeline", "naive"), 3, "{ws}/d/", "test",
         setup=_split_part_undecodable("d")),
    Case("test-split-undecodable-tfdata", TD + ("{ws}/d", "--pipeline", "tfdata"), 3, "{ws}/d/", "test",
         setup=_split_part_undecodable("d")),
    Case("train-split-undecodable-featcache", TD + ("{ws}/d", "--pipeline", "featcache"), 3, "{ws}/d/", "train",
         setup=_split_part_undecodable("d", "train")),
    Case("undecodable-tutorial", TD + ("{ws}/d", "--pipeline", "tutorial"), 3, "{ws}/d/", "tfdata",
         setup=_split_part_undecodable("d")),
    Case("strict-newline-in-file-name", TD + ("{ws}/d", "--strict"), 3, "bad\\nname.jpg",
         setup=_split_part_undecodable("d", name="bad\nname.jpg")),
    # --- issue 23: TensorBoard, profiler and MLflow destinations (more in tests/test_tracking.py)
    Case("train-profile-is-a-file", T + ("--profile", RESULTS), 8, "--profile " + RESULTS, "is a file"),
    Case("report-tensorboard-is-a-file", ("report", RESULTS, "--tensorboard", RESULTS), 8, "--tensorboard",
         "is a file", tool="bench"),
    Case("report-mlflow-unknown-scheme", ("report", RESULTS, "--mlflow", "ftp://h/x"), 2, "--mlflow ftp://h/x",
         "not a tracking URI", tool="bench"),
    Case("report-mlflow-no-scheme", ("report", RESULTS, "--mlflow", "localhost:5000"), 2, "--mlflow localhost:5000",
         "http://localhost:5000", tool="bench"),
    Case("report-mlflow-sqlite-folder", ("report", RESULTS, "--mlflow", "sqlite:///{ws}/results"), 8, "--mlflow",
         "a folder", tool="bench"),
]
assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def invoke(tool: str, argv: list[str], capsys) -> tuple[int, str, str]:
    main = {"ff": ff_cli.main, "bench": bench_cli.main}[tool]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_line_naming_it(case: Case, ws, small_model, monkeypatch, capsys):
    if case.setup:
        case.setup(ws, monkeypatch)
    fill = lambda text: text.format(ws=ws, model=small_model)  # noqa: E731
    before = snapshot(ws)
    code, out, err = invoke(case.tool, [fill(a) for a in case.argv], capsys)
    monkeypatch.undo()  # the full-disk patches end here, before the checks read files
    assert code == case.code, err
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert fill(case.names) in lines[0], lines[0]
    assert fill(case.says) in lines[0], lines[0]
    assert_unchanged(before)


# --- cases with more to check than one line ---------------------------------------------------

def test_resume_from_another_folder_writes_only_beside_its_csv(ws, capsys, monkeypatch):
    """Issue 12's item 3: the advice printed after Ctrl-C, followed from elsewhere."""
    csv_path = run_files(ws / "res" / "int")  # its one configuration is done: nothing left to run
    other = ws / "other"
    run_files(other / "results", name="run-20260102-000000")
    (other / "results" / "latest.csv").write_text(HEADER + ROW_OK)
    monkeypatch.chdir(other)
    before = snapshot(ws)
    code, out, err = invoke("bench", ["run", "--resume", str(csv_path)], capsys)
    assert code == 0 and "Traceback" not in err
    assert_unchanged(before)
    assert not (other / "results" / "logs").exists()


def test_resume_reruns_a_row_cut_short_and_keeps_the_finished_ones(ws, capsys):
    csv_path = run_files(ws / "r", HEADER + ROW_OK + ROW_OK.replace("naive", "tfdata")[:25],
                         {**RUN_JSON, "configs": "naive"})
    code, out, err = invoke("bench", ["run", "--resume", str(csv_path)], capsys)
    assert code == 0 and "Traceback" not in err
    assert "cut short" in err and str(csv_path) in err
    # The finished row as it was (the rewrite adds blank contract columns); the cut one gone.
    kept = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert len(kept) == 1
    assert kept[HEADER.strip().split(",")].iloc[0].tolist() == ROW_OK.strip().split(",")


def test_a_run_being_written_cannot_be_resumed_at_the_same_time(ws, capsys):
    import fcntl

    csv_path = run_files(ws / "r")
    before = snapshot(ws)
    with open(csv_path.with_suffix(".json"), "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a running sweep holds it
        code, out, err = invoke("bench", ["run", "--resume", str(csv_path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "another bench run" in err and str(csv_path) in err
    assert_unchanged(before)


def test_full_disk_at_start_leaves_no_run_file_behind(ws, capsys, monkeypatch):
    _full_disk(ws, monkeypatch)
    code, out, err = invoke("bench", ["run", "--configs", "naive", "--out", str(ws / "full")], capsys)
    monkeypatch.undo()
    assert code == 8
    assert not list((ws / "full").glob("run-*"))  # so a later --resume is not broken by an empty JSON


def test_a_failed_save_leaves_nothing_half_written(tmp_path):
    """--save writes into a temporary sibling and renames it: a full disk mid-save leaves no
    partial model where predict would find it (and no temporary folder either)."""
    from flowers_fast.errors import OutputError

    def full_disk_midway(tmp):
        (tmp / "saved_model.pb").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="--save .*model: cannot write .No space left on device.") as err:
        ff_cli.write_folder(tmp_path / "model", "--save", full_disk_midway)
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_closed_stdout_pipe_ends_quietly(capsys, monkeypatch):
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Closed())
    code = bench_cli.main(["list"])
    assert code == 141 and "Traceback" not in capsys.readouterr().err


# --- signals: a sweep hit by Ctrl-C or SIGTERM --------------------------------------------------

@pytest.mark.parametrize("sig,code,how", [(signal.SIGINT, 130, "interrupted"),
                                          (signal.SIGTERM, 143, "stopped by SIGTERM")], ids=["SIGINT", "SIGTERM"])
def test_signal_to_a_sweep_marks_the_running_row_and_keeps_the_rest(tmp_path, cache, sig, code, how):
    out = tmp_path / "res"
    run_files(out, name="run-20260101-000000")  # an earlier run in the same folder
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--preset", "smoke", "--configs", "naive",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("logs/*/naive-cpu-r0.log")):  # the worker is starting
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert how in last and "0 finished rows kept" in last and "--resume" in last
    run = Path(last.rsplit("--resume ", 1)[1])
    assert run.is_absolute() and run.read_text().splitlines()[1].split(",")[5] == "interrupted"
    assert_unchanged(before)


# --- image files: what cameras and phones write, the same pixels in every pipeline ---------------

IMAGE_KINDS = ("plain.jpg", *(f"exif-orientation-{o}.jpg" for o in range(2, 9)), "progressive.jpg", "cmyk.jpg",
               "grayscale.jpg", "rgba.png", "gray-alpha.png", "16-bit.png", "palette.gif", "animated.gif",
               "webp-named.jpg", "png-named.jpg", "bmp-named.jpg", "one-pixel.jpg", "truncated.jpg",
               "header-only.jpg", "zero-bytes.jpg", "heic-named.jpg")


def _odd_images(root: Path) -> dict[str, Path]:
    rgb = synthetic.render(2, np.random.default_rng(3))[:240, :320]
    image = Image.fromarray(np.ascontiguousarray(rgb))
    made = {}

    def save(name, write):
        made[name] = root / name
        write(made[name])

    save("plain.jpg", lambda p: image.save(p, quality=92))
    for o in range(2, 9):
        save(f"exif-orientation-{o}.jpg", lambda p, o=o: jpeg(p, 2, 3, exif_orientation=o))
    save("progressive.jpg", lambda p: image.save(p, quality=92, progressive=True))
    save("cmyk.jpg", lambda p: image.convert("CMYK").save(p, quality=92))
    save("grayscale.jpg", lambda p: image.convert("L").save(p, quality=92))
    save("rgba.png", lambda p: image.convert("RGBA").save(p))
    save("gray-alpha.png", lambda p: image.convert("LA").save(p))
    save("16-bit.png", lambda p: cv2.imwrite(str(p), rgb[..., ::-1].astype(np.uint16) * 257))
    save("palette.gif", lambda p: image.convert("P", palette=Image.ADAPTIVE).save(p, format="GIF"))
    save("animated.gif", lambda p: image.convert("P").save(p, format="GIF", save_all=True,
                                                           append_images=[image.rotate(90).convert("P")]))
    save("webp-named.jpg", lambda p: image.save(p, format="WEBP"))
    save("png-named.jpg", lambda p: image.save(p, format="PNG"))
    save("bmp-named.jpg", lambda p: image.save(p, format="BMP"))
    save("one-pixel.jpg", lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p))
    raw = made["plain.jpg"].read_bytes()
    save("truncated.jpg", lambda p: p.write_bytes(raw[: len(raw) // 2]))
    save("header-only.jpg", lambda p: p.write_bytes(raw[:300]))
    save("zero-bytes.jpg", lambda p: p.write_bytes(b""))
    save("heic-named.jpg", lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x07" * 500))
    assert tuple(made) == IMAGE_KINDS
    return made


UNDECODABLE = {"header-only.jpg", "zero-bytes.jpg", "heic-named.jpg"}


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """Each odd file through the naive loader (cv2.imread RGB), tf.data (plain and DCT decode)
    and predict's reader, in one pass each: {name: (naive, tfdata, tfdata_dct, predict)}."""
    from flowers_fast import baseline, pipeline
    from flowers_fast.config import RunConfig
    from flowers_fast.predict import read_image

    files = _odd_images(tmp_path_factory.mktemp("odd_images"))
    paths = [str(p) for p in files.values()]
    naive, kept, _ = baseline.load_images(paths, SIZE, rgb=True, progress=False)
    by_naive = {paths[k]: naive[j] for j, k in enumerate(kept)}
    out = {}
    for dct in (False, True):
        cfg = RunConfig(image_size=SIZE, dct_decode=dct)
        out[dct] = {p.decode(): im for im, _, p in
                    pipeline.decode_dataset(paths, [0] * len(paths), cfg, with_path=True).as_numpy_iterator()}
    result = {}
    for name, path in files.items():
        try:
            predicted = np.asarray(read_image(path, SIZE)).round().astype(np.uint8)
        except Exception:
            predicted = None
        result[name] = (by_naive.get(str(path)), out[False].get(str(path)), out[True].get(str(path)), predicted)
    return result


@pytest.mark.parametrize("name", IMAGE_KINDS)
def test_odd_image_files_give_every_pipeline_the_same_pixels(decoded, name):
    naive, tfdata, dct, predicted = decoded[name]
    if name in UNDECODABLE:  # skipped (and counted) by both loaders; predict says so in one line
        assert naive is None and tfdata is None and dct is None and predicted is None
        return
    assert naive is not None and tfdata is not None and dct is not None and predicted is not None, name
    diff = np.abs(naive.astype(np.int16) - tfdata.astype(np.int16))
    # The cut JPEG's last decoded block row differs between the decoders; everything else matches.
    assert diff.mean() < (3.0 if name == "truncated.jpg" else 2.0), f"{name}: mean diff {diff.mean():.2f}"
    assert np.abs(predicted.astype(np.int16) - tfdata.astype(np.int16)).mean() < 1.0  # predict = tf.data
    # The reduced DCT decode differs by design, but never by orientation.
    assert np.abs(naive.astype(np.int16) - dct.astype(np.int16)).mean() < 6.0, name
