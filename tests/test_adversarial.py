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

import csv
import io
import json
import os
import re
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


def _symlink(rel: str, target: str):
    return lambda ws, mp: (ws / rel).symlink_to(target)


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


def _data_dir_run(rel: str, data_rel: str, older: bool = False, handle: str = "random", marker: bool = False):
    """A finished run on ``--data-dir data_rel`` (8 images, as its one row recorded them); ``older``:
    the row as written before rows recorded ``data_files`` (its counts add up instead). With a
    ``handle`` folder: a plain SavedModel then, the offline export's marker in it now (``marker``)."""
    def step(ws, mp):
        root = folder(ws / data_rel)
        handle_ = handle.format(ws=ws)
        if handle != "random":
            Path(handle_).mkdir()
            (Path(handle_) / "saved_model.pb").write_bytes(b"a model")
        fields = dict(dataset="flowers", data_dir=str(root), model_handle=handle_,
                      weights="random" if handle == "random" else "unknown (local)", train_images=6, test_images=2,
                      skipped_files=0)
        if not older:
            fields.update(data_files=8, data_fingerprint=data.fingerprint(data.discover(root)))
        header = HEADER.strip() + "," + ",".join(fields) + "\n"
        row = ROW_OK.strip() + "," + ",".join(f'"{v}"' for v in fields.values()) + "\n"
        run_files(ws / rel, header + row, {**RUN_JSON, "data_dir": str(root),
                                          **({"model_handle": handle_} if handle != "random" else {})})
        if marker:
            from flowers_fast.config import WEIGHTS_MARKER

            (Path(handle_) / WEIGHTS_MARKER).write_text("random MobileNetV2\n")
    return step


def _remove_images(rel: str, n: int, folder: bool = False):
    def step(ws, mp):
        import shutil

        files = sorted((ws / rel).rglob("*.jpg"))
        for f in files[:n]:
            f.unlink()
        if folder:
            shutil.rmtree(ws / rel)
    return step


def _rename_image(rel: str):
    def step(ws, mp):
        first = sorted((ws / rel).rglob("*.jpg"))[0]
        first.rename(first.with_name("renamed.jpg"))
    return step


NOT_UTF8 = os.fsdecode(b"\xe9")  # how os.listdir gives the byte 0xE9 of a Latin-1 name: a surrogate escape


def _name_not_utf8(root: Path, image: bool = True) -> Path:
    """A class folder whose first image is renamed ``b'caf\\xe9.jpg'`` (not UTF-8), and broken
    unless ``image``; returns its path."""
    folder(root)
    path = root / "daisy" / f"caf{NOT_UTF8}.jpg"
    (root / "daisy" / "0.jpg").rename(path)
    if not image:
        path.write_text("not an image\n")
    return path


def _class_undecodable(root: Path, name: str = "tulips") -> None:
    """Three class folders; every image of ``name`` cannot be decoded."""
    folder(root, ("daisy", "roses", "tulips"))
    for f in (root / name).iterdir():
        f.write_text("not an image\n")


def _images_in_subfolder(root: Path, name: str, every: int = 2) -> Path:
    """Every ``every``-th image of class folder ``name`` moved into its subfolder ``2024/``."""
    sub = root / name / "2024"
    sub.mkdir()
    for f in sorted((root / name).glob("*.jpg"))[::every]:
        f.rename(sub / f.name)
    return root


T = ("train", "--image-size", str(SIZE), "--epochs", "1", "--quiet", "--model-handle", "{model}")
TD = T + ("--data-dir",)  # + a folder
RESULTS = "{ws}/results/run-20260101-000000.csv"
EARLIER = "results/run-20260101-000000.csv"  # the same, relative to the workspace (the current folder)

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
    Case("shard-store-without-multiworker", ("train", "--pipeline", "featcache", "--shard-store", "{ws}/s"), 2,
         "--shard-store", "add --strategy multiworker"),
    Case("data-dir-and-other-dataset", ("train", "--dataset", "tfds", "--data-dir", "{ws}/d"), 2, "--data-dir",
         setup=_folder("d")),
    Case("featcache-fine-tune", ("train", "--pipeline", "featcache", "--fine-tune"), 2, "--fine-tune"),
    Case("featcache-fine-tune-epochs", ("train", "--pipeline", "featcache", "--fine-tune-epochs", "2"), 2,
         "--fine-tune-epochs", "use --pipeline cutcache"),
    Case("cutcache-alone", ("train", "--pipeline", "cutcache"), 2, "--pipeline cutcache", "add --fine-tune-epochs"),
    Case("featcache-augment", ("train", "--pipeline", "featcache", "--augment"), 2, "--augment",
         "use --pipeline tfdata"),
    Case("fine-tune-from-alone", ("train", "--fine-tune-from", "100"), 2, "--fine-tune-from",
         "add --fine-tune-epochs"),
    Case("fine-tune-from-bad-form", ("train", "--fine-tune-epochs", "1", "--fine-tune-from", "block 15!"), 2,
         "--fine-tune-from", "expected a layer index"),
    Case("fine-tune-from-no-such-block", ("train", "--model-handle", "{model}", "--image-size", "96", "--num-images",
                                          "20", "--fine-tune-epochs", "1", "--fine-tune-from", "block_99"), 4,
         "--fine-tune-from block_99", "no such layer or block"),
    Case("modelonly-save", ("train", "--pipeline", "modelonly", "--save", "{ws}/m2"), 2, "--save"),
    Case("multiworker-without-tf-config", T + ("--strategy", "multiworker", "--num-images", "10"), 2, "TF_CONFIG",
         setup=_no_tf_config),
    Case("tune-budget-words", ("tune", "--budget", "ten minutes"), 2, "--budget", "90s, 10m or 1h", tool="bench"),
    Case("config-unknown-key", ("train", "--config", "{ws}/c.json"), 2, "{ws}/c.json", "unknown key 'batch'",
         setup=_write("c.json", '{"batch": 64}')),
    Case("config-bad-value", ("run", "--config", "{ws}/c.json"), 2, "{ws}/c.json", "key 'batch_size'",
         setup=_write("c.json", '{"batch_size": 0}'), tool="bench"),
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

    # --- issue 19: outputs (an output that exists is refused unless --overwrite; never an input,
    # a run's files or two outputs at one path, even with --overwrite; checked before any work)
    Case("report-html-over-a-file", ("report", RESULTS, "--html", "{ws}/notes.txt"), 8, "--html {ws}/notes.txt",
         "--overwrite", setup=_write("notes.txt", "my notes\n"), tool="bench"),
    Case("report-html-through-a-symlink", ("report", RESULTS, "--html", "{ws}/link.html"), 8, "--html",
         "(a symlink)", setup=_symlink("link.html", "afile"), tool="bench"),
    Case("report-html-dangling-symlink", ("report", RESULTS, "--html", "{ws}/link.html"), 8, "--html",
         "already exists", setup=_symlink("link.html", "nowhere.html"), tool="bench"),
    Case("report-markdown-over-a-file", ("report", RESULTS, "--markdown", "{ws}/notes.txt"), 8, "--markdown",
         "--overwrite", setup=_write("notes.txt", "my notes\n"), tool="bench"),
    Case("report-html-another-runs-csv", ("report", RESULTS, "--html", "{ws}/r/run-1.csv", "--overwrite"), 8,
         "--html {ws}/r/run-1.csv", "results file", setup=_run("r"), tool="bench"),
    Case("report-html-a-runs-json", ("report", RESULTS, "--html", "{ws}/results/run-20260101-000000.json",
                                     "--overwrite"), 8, "--html", "even with --overwrite", tool="bench"),
    Case("report-html-a-started-runs-json", ("report", RESULTS, "--html", "{ws}/s/run-9.json", "--overwrite"), 8,
         "--html", "results file", setup=_write("s/run-9.json", json.dumps(RUN_JSON)), tool="bench"),
    Case("report-html-latest-csv", ("report", RESULTS, "--html", "{ws}/results/latest.csv", "--overwrite"), 8,
         "--html", "results file", tool="bench"),
    Case("report-html-its-csv-with-overwrite", ("report", RESULTS, "--html", RESULTS, "--overwrite"), 8, "--html",
         "one of the CSVs being reported", tool="bench"),
    Case("report-html-and-markdown-one-file", ("report", RESULTS, "--markdown", "{ws}/r.out", "--html",
                                               "{ws}/r.out"), 2, "--html {ws}/r.out", "--markdown", tool="bench"),
    Case("report-plot-over-pngs", ("report", RESULTS, "--plot"), 8, "--plot", "run-20260101-000000-time.png",
         setup=_write("results/run-20260101-000000-time.png", b"\x89PNG my chart"), tool="bench"),
    Case("train-json-over-a-file", ("train", "--json", "{ws}/afile"), 8, "--json {ws}/afile", "--overwrite"),
    Case("train-json-dangling-symlink", ("train", "--json", "{ws}/link.json"), 8, "--json", "(a symlink)",
         setup=_symlink("link.json", "nowhere.json")),
    Case("train-json-a-runs-csv-with-overwrite", ("train", "--json", RESULTS, "--overwrite"), 8, "--json",
         "results file"),
    Case("train-json-a-figure", ("train", "--figures", "{ws}/f2", "--json", "{ws}/f2/tfdata-confusion.png"), 2,
         "--json", "--figures"),
    Case("train-json-inside-save", ("train", "--save", "{ws}/m3", "--json", "{ws}/m3/row.json"), 2, "--json",
         "--save"),
    Case("train-figures-over-figures-symlink", ("train", "--figures", "{ws}/f3"), 8, "--figures",
         "tfdata-predictions.png", setup=_fs(_mkdir("f3"), _symlink("f3/tfdata-predictions.png", "../afile"))),
    Case("loopback-logs-over-logs", ("loopback", "--logs", "{ws}/lg"), 8, "--logs", "worker0.json",
         setup=_write("lg/worker0.json", "{}"), tool="bench"),

    # --- issue 19: data identity and labels (a resumed run never mixes rows on other data)
    Case("resume-data-dir-lost-images", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "--resume {ws}/r/run-1.csv",
         "data_images 8 vs 5", setup=_fs(_data_dir_run("r", "d"), _remove_images("d", 3)), tool="bench"),
    Case("resume-data-dir-gained-images", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "--resume {ws}/r/run-1.csv",
         "data_images 8 vs 12", setup=_fs(_data_dir_run("r", "d"), _folder("d", per_class=6)), tool="bench"),
    Case("resume-data-dir-renamed-files", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "--resume {ws}/r/run-1.csv",
         "data_fingerprint", setup=_fs(_data_dir_run("r", "d"), _rename_image("d")), tool="bench"),
    Case("resume-older-row-other-count", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "--resume {ws}/r/run-1.csv",
         "data_images 8 vs 5", setup=_fs(_data_dir_run("r", "d", older=True), _remove_images("d", 3)),
         tool="bench"),
    Case("resume-data-dir-gone", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "--data-dir {ws}/d",
         "does not exist", setup=_fs(_data_dir_run("r", "d"), _remove_images("d", 8, folder=True)), tool="bench"),
    Case("resume-weights-now-random", ("run", "--resume", "{ws}/r/run-1.csv"), 3, "--resume {ws}/r/run-1.csv",
         "weights unknown (local) vs random", setup=_data_dir_run("r", "d", handle="{ws}/m", marker=True),
         tool="bench"),


    # --- issue 19: data (names that are not UTF-8, odd data, silent loss)
    *(Case(f"class-all-undecodable-{p}", TD + ("{ws}/d", "--pipeline", p), 3, "{ws}/d/tulips/", "none of its 4 images",
           setup=lambda ws, mp: _class_undecodable(ws / "d")) for p in ("naive", "tutorial", "tfdata", "featcache")),
    *(Case(f"strict-name-not-utf8-{p}", TD + ("{ws}/d", "--pipeline", p, "--strict"), 3, "caf\\xe9.jpg",
           "cannot be decoded", setup=lambda ws, mp: _name_not_utf8(ws / "d", image=False))
      for p in ("naive", "tfdata", "featcache")),
    Case("undecodable-tutorial-name-not-utf8", TD + ("{ws}/d", "--pipeline", "tutorial"), 3, "caf\\xe9.jpg",
         "tutorial's loader", setup=lambda ws, mp: _name_not_utf8(ws / "d", image=False)),
    Case("predict-name-not-utf8-undecodable", ("predict", "{ws}/caf" + NOT_UTF8 + ".jpg"), 3, "{ws}/caf\\xe9.jpg",
         "cannot be decoded", setup=_write("caf" + NOT_UTF8 + ".jpg", "not an image\n")),
    Case("class-images-only-in-subfolder", TD + ("{ws}/d",), 3, "tulips/", "move them up into {ws}/d/tulips/",
         setup=lambda ws, mp: _images_in_subfolder(folder(ws / "d", ("daisy", "roses", "tulips")), "tulips", every=1)),

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
    # SIGINT as a terminal's Ctrl-C delivers it, even when this runs as a background job (SIGINT ignored).
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--preset", "smoke", "--configs", "naive",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


# --- issue 19: outputs (overwrite, escaping, file modes, leftovers) -----------------------------

def test_overwrite_replaces_an_output_and_a_symlink_itself_never_its_target(ws, capsys):
    notes = ws / "notes.txt"
    notes.write_text("my notes\n")
    (ws / "link.md").symlink_to("afile")
    before = (ws / "afile").read_bytes()
    code, out, err = invoke("bench", ["report", EARLIER, "--html", str(notes), "--markdown", str(ws / "link.md"),
                                      "--overwrite"], capsys)
    assert code == 0, err
    assert notes.read_text().lstrip().lower().startswith("<!doctype html")
    assert not (ws / "link.md").is_symlink() and (ws / "link.md").read_text().startswith("# ")
    assert (ws / "afile").read_bytes() == before  # the file the link pointed at is untouched


def test_report_plot_refuses_existing_pngs_and_overwrite_redraws_them(ws, capsys):
    png = ws / "results" / "run-20260101-000000-accuracy.png"
    png.write_bytes(b"my chart")
    code, _, err = invoke("bench", ["report", EARLIER, "--plot"], capsys)
    assert code == 8 and "--plot" in err and png.read_bytes() == b"my chart"
    assert sorted(p.name for p in png.parent.glob("*.png")) == [png.name]  # nothing drawn before the check
    code, _, err = invoke("bench", ["report", EARLIER, "--plot", "--overwrite"], capsys)
    assert code == 0, err
    assert png.read_bytes().startswith(b"\x89PNG") and len(list(png.parent.glob("*.png"))) == 3


def _user_text_run(root: Path) -> Path:
    """A run whose folder name and error text carry HTML, a pipe, a newline and a formula."""
    header = HEADER.rstrip("\n") + ",data_dir\n"
    ok = ROW_OK.rstrip("\n") + ",<script>alert(1)</script>|d\n"
    failed = ('A,smoke,tfdata,cpu,0,error,"<img src=x onerror=alert(1)> | =HYPERLINK(""http://x"")\n'
              '## injected heading",tfdata,,,,,,<script>alert(2)</script>\n')
    return run_files(root, header + ok + failed)


def test_markdown_report_escapes_user_text(tmp_path, capsys):
    csv_path = _user_text_run(tmp_path / "r")
    md, html = tmp_path / "report.md", tmp_path / "report.html"
    code, _, err = invoke("bench", ["report", str(csv_path), "--markdown", str(md), "--html", str(html)], capsys)
    assert code == 0, err
    for path in (md, html):
        # A Markdown code block (the reproducing command, indented) shows its text as it is.
        shown = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("    "))
        assert "<script>alert" not in shown and "<img src=x" not in shown, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown, path
    lines = md.read_text().splitlines()
    assert not any(line.startswith("## injected") for line in lines)  # a newline starts no block of its own
    # A cell's | is escaped: every row of a pipe table has as many cells as its header.
    table = [line for line in lines if line.startswith("| what |") or line.startswith("| data |")]
    # (The two rows were measured on different data folders: a table for each.)
    assert len(table) == 4 and len({len(re.split(r"(?<!\\)\|", line)) for line in table}) == 1, table


def test_results_csv_neutralises_formulas_and_reads_them_back(tmp_path):
    from bench.results import load
    from flowers_fast.outputs import spreadsheet_safe, spreadsheet_text

    path = tmp_path / "run-1.csv"
    texts = {"error": '=HYPERLINK("http://evil","click")', "data_dir": "@SUM(1)", "handle": "+cmd|' /C calc'!A0",
             "dataset": "-2+3", "skipped_list": "\tx", "name": "naive"}
    results = bench_run.ResultsFile(path, tmp_path / "latest.csv")
    results.add({"run_id": "A", "device": "cpu", "repeat": 0, "status": "ok", "test_accuracy": 0.5,
                 "total_s": -1.5, **texts})
    raw = path.read_text()
    cells = [c for row in csv.reader(io.StringIO(raw)) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t") or (c[:1] == "-" and c != "-1.5")], cells
    assert "'=HYPERLINK" in raw and "-1.5" in raw  # a number stays a number
    rows, _ = bench_run.read_rows(path)  # what --resume reads: the text as the row had it
    assert {k: rows[0][k] for k in texts} == texts
    bench_run.ResultsFile(path, None).add({**rows[0], "repeat": 1})  # resumed: the first row is unchanged
    assert path.read_text().splitlines()[1] == raw.splitlines()[1]
    df = load([path])  # what bench report reads
    assert df.loc[0, "error"] == texts["error"] and df.loc[0, "data_dir"] == texts["data_dir"]
    for value in ["=1", "'=1", "''@x", "'plain", "-x", "-1e5", "nan", "", "a=b"]:
        assert spreadsheet_text(spreadsheet_safe(value)) == value


def test_confusion_csv_neutralises_class_names(tmp_path):
    from flowers_fast import figures
    from flowers_fast.outputs import spreadsheet_text

    classes = ["=SUM(A1:A9)", "+cmd", "-x", "@at", "\tt", "roses"]
    csv_path, _ = figures.confusion_matrix([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 5, 5], classes, tmp_path, "tfdata")
    cells = [c for row in csv.reader(io.StringIO(csv_path.read_text())) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t")], cells
    table = pd.read_csv(csv_path, index_col=0, keep_default_na=False)
    assert [spreadsheet_text(c) for c in table.columns] == classes
    assert [spreadsheet_text(c) for c in table.index] == classes


def test_formula_class_names_round_trip_through_save_and_predict(tmp_path, small_model, capsys):
    """classes.txt keeps the names as they are (predict reads it back, it is no spreadsheet); the
    confusion CSV neutralises them; predict prints them as trained."""
    classes = ("=HYPERLINK(x)", "@SUM(1)", "-roses")
    data_dir = folder(tmp_path / "d", classes=classes, per_class=5)
    model, figs = tmp_path / "model", tmp_path / "figs"
    code, _, err = invoke("ff", ["train", "--data-dir", str(data_dir), "--image-size", str(SIZE), "--epochs", "1",
                                 "--quiet", "--model-handle", str(small_model), "--save", str(model),
                                 "--figures", str(figs)], capsys)
    assert code == 0, err
    assert (model / "classes.txt").read_text().splitlines() == sorted(classes)
    assert "'=HYPERLINK(x)" in (figs / "tfdata-confusion.csv").read_text()
    image = next((data_dir / "@SUM(1)").iterdir())
    code, out, err = invoke("ff", ["predict", str(image), "--checkpoint", str(model)], capsys)
    assert code == 0, err
    assert sorted(line.split(maxsplit=1)[1] for line in out.splitlines() if line.startswith("  ")) == sorted(classes)


def test_predict_prints_control_characters_in_names_escaped(monkeypatch, capsys):
    from flowers_fast import predict

    name = "a.jpg\n  1  roses\n\x1b[2Kb.jpg"
    monkeypatch.setattr(predict, "predict", lambda images, **kw: predict.Predictions(
        list(images), np.array([[0.75, 0.25]]), ["daisy", "ro\rses"], "m", "tf", "fp32"))
    code, out, _ = invoke("ff", ["predict", name, "--top", "2"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[1:] == ["a.jpg\\n  1  roses\\n\\x1b[2Kb.jpg", "  0.75  daisy", "  0.25  ro\\rses"], lines


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_results_files_get_the_mode_the_umask_gives(tmp_path, cache, monkeypatch, mask, mode):
    """mkstemp's 0600 must not survive the atomic rename: a shared results folder stays readable."""
    from bench import machine
    from flowers_fast import featurestore, figures

    row = {"status": "ok", "pipeline": "naive", "test_accuracy": 0.9, "total_s": 10.0, "steady_epoch_s": 1.5,
           "train_img_s": 30.0, "peak_rss_mb": 900.0, "data_prep_s": 1.0, "first_epoch_s": 2.0, "error": ""}
    monkeypatch.setattr(bench_run, "run_one", lambda *a, **k: dict(row))
    old = os.umask(mask)
    try:
        result = bench_run.sweep(["naive"], preset="smoke", out=tmp_path / "res", quiet=True)
        written = [result.csv, result.csv.with_suffix(".json"), result.csv.with_suffix(".md"),
                   result.csv.with_suffix(".html"), tmp_path / "res" / "latest.csv"]
        written += [result.plot(kind) for kind in ("time", "accuracy", "stages")]
        written += figures.confusion_matrix([0, 1], [0, 1], ["a", "b"], tmp_path / "f", "x")
        written.append(featurestore.save(tmp_path / "c", "k", {"a": 1}, ["f.jpg"], np.zeros((1, 2)), "fp32"))
        measured = machine.Measured(tmp_path / "c", "m", "2")
        measured.get("peak", lambda: 1.0)
        written.append(measured.path)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {p.name: oct(os.stat(p).st_mode & 0o777) for p in written}
    assert set(modes.values()) == {oct(mode)}, modes


def test_a_save_folder_gets_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        ff_cli.write_folder(tmp_path / "model", "--save", lambda tmp: (tmp / "x").write_text("x"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "model").st_mode & 0o777 == 0o755


def test_a_failed_train_removes_the_folders_it_made_and_keeps_the_users(ws, capsys, monkeypatch):
    from flowers_fast.errors import DataError

    def fails(*args, **kwargs):
        raise DataError("d: every image failed to decode")

    monkeypatch.setattr(train, "run", fails)
    code, _, err = invoke("ff", ["train", "--figures", str(ws / "new" / "figs"), "--json", str(ws / "out" / "r.json"),
                                 "--save", str(ws / "saved" / "m")], capsys)
    assert code == 3, err
    assert not (ws / "new").exists() and not (ws / "out").exists() and not (ws / "saved").exists()
    code, _, err = invoke("ff", ["train", "--figures", str(ws / "emptydir")], capsys)
    assert code == 3 and (ws / "emptydir").is_dir()  # the user's folder stays


def test_a_new_run_never_takes_the_name_of_a_file_already_there(tmp_path, monkeypatch):
    class Frozen(bench_run.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 0, 0, 0)

    monkeypatch.setattr(bench_run, "datetime", Frozen)
    (tmp_path / "run-20260101-000000.md").write_text("my notes")
    (tmp_path / "run-20260101-000000-2-time.png").symlink_to("nowhere")
    run_id, path = bench_run.new_run_path(tmp_path)
    assert run_id == "20260101-000000-3" and path.name == "run-20260101-000000-3.csv"


def test_a_refused_output_leaves_no_folder_made_for_another(ws, capsys, monkeypatch):
    (ws / "notes.txt").write_text("my notes\n")
    code, _, err = invoke("bench", ["report", EARLIER, "--markdown", str(ws / "new" / "sub" / "r.md"), "--html",
                                    str(ws / "notes.txt")], capsys)
    assert code == 8 and "--html" in err and not (ws / "new").exists()
    monkeypatch.setenv("FLOWERS_FAST_CACHE", str(ws / "afile"))  # fails after --out was made
    code, _, err = invoke("bench", ["run", "--configs", "naive", "--out", str(ws / "newout" / "r")], capsys)
    assert code == 8 and "FLOWERS_FAST_CACHE" in err and not (ws / "newout").exists()

# --- issue 19: data identity and labels --------------------------------------------------------

def test_resume_on_unchanged_data_goes_on(ws, capsys):
    _data_dir_run("r", "d")(ws, None)
    code, out, err = invoke("bench", ["run", "--resume", str(ws / "r" / "run-1.csv")], capsys)
    assert code == 0 and "error:" not in err, err


def test_weights_say_what_the_handle_shows(tmp_path, cache):
    from flowers_fast import config
    from flowers_fast import model as models

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "saved_model.pb").write_bytes(b"a model")
    assert models.resolve_handle(str(plain), cache) == (str(plain), "unknown (local)")
    (plain / config.WEIGHTS_MARKER).write_text("random MobileNetV2, seed 0\n")  # what hubexport writes
    assert models.resolve_handle(str(plain), cache)[1] == "random"
    assert config.weights_label(config.HUB_FEATURE_VECTOR) == "pretrained (imagenet)"
    assert config.weights_label("https://example.org/my/model/1") == "unknown (downloaded)"
    # A folder as TF Hub caches a download: the descriptor beside it names the URL.
    hub = tmp_path / "hub" / "0123abcd"
    hub.mkdir(parents=True)
    (tmp_path / "hub" / "0123abcd.descriptor").write_text(f"Module: {config.HUB_CLASSIFIER}\nDownload Time: x\n")
    assert config.weights_label(str(hub)) == "pretrained (imagenet)"


def test_featcache_save_is_a_model_predict_loads_and_rows_say_what_ran(tmp_path, small_model, capsys):
    """Issue 19: featcache --save wrote a head alone (predict refused it); run.json and --json said
    name tfdata and num_images 3670 for a --data-dir of 8 images; a local handle said pretrained."""
    import shutil

    from flowers_fast.config import WEIGHTS_MARKER

    handle = tmp_path / "copied-model"
    shutil.copytree(small_model, handle, ignore=shutil.ignore_patterns(WEIGHTS_MARKER))
    d = folder(tmp_path / "d")
    code, out, err = invoke("ff", ["train", "--pipeline", "featcache", "--data-dir", str(d), "--image-size",
                                   str(SIZE), "--epochs", "1", "--quiet", "--no-breakdown", "--model-handle",
                                   str(handle), "--save", str(tmp_path / "m"), "--json", str(tmp_path / "row.json")],
                          capsys)
    assert code == 0, err
    assert "frozen backbone with the trained head" in out and "weights unknown (local)" in out
    row = json.loads((tmp_path / "row.json").read_text())
    assert (row["name"], row["num_images"], row["data_files"], row["weights"]) == ("featcache", 8, 8,
                                                                                   "unknown (local)")
    assert row["data_fingerprint"] == data.fingerprint(data.discover(d))
    saved = json.loads((tmp_path / "m" / "run.json").read_text())
    assert (saved["name"], saved["pipeline"], saved["num_images"]) == ("featcache", "featcache", 8)
    code, out, err = invoke("ff", ["predict", "--checkpoint", str(tmp_path / "m"), str(d / "roses" / "0.jpg")],
                            capsys)
    assert code == 0, err
    assert "2 classes: daisy, roses" in out


def test_a_finite_divergence_stops_like_nan(tmp_path, small_model, capsys):
    """Issue 19: --learning-rate 1e6 ended at test loss 2.6e8 with exit 0; only NaN was caught."""
    assert train.divergence(2.6e8, 5, "on the test set", 1e6) is not None
    assert train.divergence(float("nan"), 5, "in epoch 2", 10) is not None
    assert train.divergence(25.0, 5, "on the test set", 0.1) is None  # lr 0.1: a poor model, not a blow-up
    code, out, err = invoke("ff", [*T[:-1], str(small_model), "--num-images", "20", "--learning-rate", "1e6"], capsys)
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "--learning-rate 1e+06: training diverged" in lines[0] and "over 100x" in lines[0]


# --- issue 19: data (names that are not UTF-8, odd data, silent loss, leftovers) -----------------

LONG_NAME = "x" * 251 + ".jpg"  # 255 bytes: the longest name Linux accepts


def _train_row(argv, tmp_path, capsys) -> tuple[int, dict, str]:
    """``train ARGV --json`` in this process: (exit code, the row, stderr)."""
    out = tmp_path / f"row-{len(list(tmp_path.glob('row-*')))}.json"
    code, _, err = invoke("ff", [*argv, "--json", str(out)], capsys)
    return code, (json.loads(out.read_text()) if out.exists() else {}), err


@pytest.mark.parametrize("pipeline", ["naive", "tutorial", "tfdata", "featcache"])
def test_names_not_utf8_or_at_the_length_limit_are_read_by_every_pipeline(pipeline, tmp_path, small_model, cache,
                                                                         capsys):
    root = tmp_path / "d"
    odd = _name_not_utf8(root)
    (root / "roses" / "0.jpg").rename(root / "roses" / LONG_NAME)
    code, row, err = _train_row([a.format(model=small_model) for a in T] + ["--data-dir", str(root), "--pipeline",
                                                                           pipeline], tmp_path, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert row["train_images"] + row["test_images"] == 8 and row["skipped_files"] == 0, row
    assert odd.exists()


def test_a_name_not_utf8_gives_the_same_pixels_in_every_reader(tmp_path):
    """The naive loader reads it with cv2.imread's own decoder (a cut JPEG too), tf.data and
    predict through its bytes; each matches the same file under a plain name."""
    from flowers_fast import baseline, pipeline
    from flowers_fast.config import RunConfig
    from flowers_fast.predict import read_image

    files = _odd_images(tmp_path)
    for kind in ("exif-orientation-6.jpg", "truncated.jpg", "png-named.jpg"):
        plain = files[kind]
        odd = plain.with_name(f"caf{NOT_UTF8}-{kind}")
        odd.write_bytes(plain.read_bytes())
        naive, kept, skipped = baseline.load_images([str(plain), str(odd)], SIZE, rgb=True, progress=False)
        assert list(kept) == [0, 1] and (naive[0] == naive[1]).all(), kind
        ds = pipeline.decode_dataset([str(plain), str(odd)], [0, 0], RunConfig(image_size=SIZE), with_path=True)
        (a, _, pa), (b, _, pb) = ds.as_numpy_iterator()
        assert (a == b).all() and pipeline.path_str(pb) == str(odd), kind
        assert (np.asarray(read_image(plain)) == np.asarray(read_image(odd))).all(), kind


def test_predict_prints_a_name_not_utf8_escaped(tmp_path, monkeypatch, capsys):
    from flowers_fast import predict

    path = tmp_path / f"caf{NOT_UTF8}.jpg"
    result = predict.Predictions([path], np.asarray([[0.25, 0.75]]), ["a", "b"], "m", "tf", "float32")
    monkeypatch.setattr(predict, "predict", lambda *a, **k: result)
    code, out, err = invoke("ff", ["predict", str(path)], capsys)
    assert code == 0 and f"{tmp_path}/caf\\xe9.jpg\n" in out, err


def test_skipped_files_and_images_in_subfolders_are_said_and_counted(tmp_path, small_model, cache, capsys):
    root = _images_in_subfolder(folder(tmp_path / "d"), "roses")  # 2 of roses' 4 images in roses/2024/
    (root / "daisy" / "notes.txt").write_text("x")
    (root / "daisy" / "1.jpg").write_text("not an image\n")
    (root / "LICENSE.txt").write_text("x")  # beside the classes, as in flower_photos: expected, not said
    jpeg(root / "stray.jpg")  # an image beside them is said
    code, row, err = _train_row([a.format(model=small_model) for a in T] + ["--data-dir", str(root), "--pipeline",
                                                                           "naive"], tmp_path, capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert f"warning: {root}/roses/2024/: 2 images in subfolders are not read; move them up into {root}/roses/" \
        in warnings
    assert any(f"{root}/daisy/: 1 files that are not images by their extension (.txt)" in w for w in warnings)
    assert f"warning: {root}/daisy/1.jpg: cannot be decoded as an image; skipped" in warnings
    assert f"warning: {root}/: 1 images beside the class folders are not read; move each into its class folder" \
        in warnings
    assert len(warnings) == 4 and "LICENSE" not in err
    assert (row["ignored_files"], row["ignored_images"], row["skipped_files"]) == (5, 3, 1)
    assert row["train_images"] + row["test_images"] == 5


def test_many_skipped_files_end_in_one_summary_line(capsys):
    files = tuple(f"/d/{c}/{i}.jpg" for c in ("a", "b") for i in range(9))
    ds = data.ImageFolder("/d", ("a", "b"), files, (0,) * 9 + (1,) * 9, "folder")
    data.check_kept(ds, files[1:9] + files[10:])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and err[0] == "warning: /d/a/1.jpg: cannot be decoded as an image; skipped"
    assert err[-1].startswith("warning: ... and 11 more files that cannot be decoded were skipped")


@pytest.mark.parametrize("pipeline,when", [("naive", "before"), ("tutorial", "before"), ("tfdata", "before"),
                                          ("featcache", "before"), ("tfdata", "training"), ("tutorial", "training")])
def test_images_deleted_mid_run_end_in_one_line_naming_one(pipeline, when, tmp_path, small_model, cache, capsys,
                                                           monkeypatch):
    """``before``: between discovery and the pipeline's read (featcache's stream, tf.data's first
    pass); ``training``: after the first pass, while --cache none reads the files every epoch."""
    from flowers_fast import pipeline as pipelines

    root = folder(tmp_path / "d")
    victim = root / "roses" / "2.jpg"
    if when == "before":
        split = data.split
        monkeypatch.setattr(data, "split", lambda *a, **k: (split(*a, **k), victim.unlink())[0])
    else:
        prepare, build = pipelines.prepare, pipelines.tutorial_datasets
        monkeypatch.setattr(pipelines, "prepare", lambda *a, **k: (prepare(*a, **k), victim.unlink())[0])
        monkeypatch.setattr(pipelines, "tutorial_datasets", lambda *a, **k: (build(*a, **k), victim.unlink())[0])
    argv = [a.format(model=small_model) for a in T] + ["--data-dir", str(root), "--pipeline", pipeline, "--cache",
                                                       "none", "--epochs", "2"]
    code, out, err = invoke("ff", argv, capsys)
    assert code == 3 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"{victim}: no longer exists" in lines[0] and "deleted or moved" in lines[0], err


@pytest.mark.parametrize("pipeline,leftover", [("tutorial", "flowers_fast_tutorial_*/train/0000/*.jpg"),
                                               ("tfdata", "flowers_fast_tfdata_*/train*")])
def test_a_worker_killed_at_timeout_leaves_no_temporary_folder(pipeline, leftover, tmp_path, small_model, cache,
                                                               monkeypatch):
    """bench kills a worker at --timeout with SIGKILL, which skips its clean-up: its temporary
    folders live in a TMPDIR that run_one removes. The timeout fires once the worker has made
    them (a real worker, killed the real way)."""
    import tempfile

    from flowers_fast.config import RunConfig

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    seen = []
    wait = subprocess.Popen.wait

    def wait_until_made(proc, timeout=None):
        if timeout is None:
            return wait(proc)
        deadline = time.monotonic() + 180
        while not seen and time.monotonic() < deadline and proc.poll() is None:
            seen.extend((tmp_path / "tmp").glob(f"bench-*/tmp/{leftover}"))
            time.sleep(0.2)
        raise subprocess.TimeoutExpired(proc.args, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", wait_until_made)
    cfg = RunConfig(name=pipeline, pipeline=pipeline, data_dir=str(folder(tmp_path / "d")), image_size=SIZE,
                    epochs=100000, cache="file", model_handle=str(small_model), breakdown=False)
    row = bench_run.run_one(cfg, 1.0, tmp_path / "w.log", dict(os.environ), worker="bench.worker")
    assert seen, (tmp_path / "w.log").read_text()[-2000:]
    assert row["status"] == "timeout"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_folder_another_process_makes_meanwhile_is_used_not_an_error(tmp_path, monkeypatch):
    """Cluster tasks share one --out: the chief and worker 1 may create results/ at the same moment.
    The loser uses the folder, and its clean-up never removes what it did not make."""
    from flowers_fast.outputs import Outputs

    real_mkdir = Path.mkdir

    def racing(self, *args, **kwargs):
        if self.name == "results":  # the other task gets there first
            real_mkdir(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing)
    with pytest.raises(RuntimeError):
        with Outputs() as outputs:
            out = outputs.folder(tmp_path / "results" / "worker-1", "--out")
            assert out.is_dir()
            raise RuntimeError("the run fails")
    assert not (tmp_path / "results" / "worker-1").exists()  # made here: removed
    assert (tmp_path / "results").is_dir()  # theirs: kept
