"""Bad input and faults: one line naming the file or flag, a distinct exit code, counted skips."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from flowers_fast import baseline, data, pipeline, synthetic, train
from flowers_fast.config import RunConfig
from flowers_fast.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flowers_fast", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def write_good(path, label=0, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), synthetic.render(label, np.random.default_rng([seed, label])))


def make_folder(root, per_class=4):
    for c, name in enumerate(("daisy", "roses")):
        for i in range(per_class):
            write_good(root / name / f"{i}.jpg", c, i)
    return root


@pytest.fixture
def messy(tmp_path):
    """A dataset with every kind of odd file the issue lists."""
    root = make_folder(tmp_path / "messy", per_class=6)
    img = synthetic.render(0, np.random.default_rng(7))
    Image.fromarray(img).save(root / "daisy" / "png_named.jpg", format="PNG")
    Image.fromarray(img).convert("L").save(root / "daisy" / "gray.jpg")
    Image.fromarray(img).convert("CMYK").save(root / "daisy" / "cmyk.jpg")
    Image.fromarray(img[:20, :20]).save(root / "roses" / "tiny.jpg")
    raw = (root / "daisy" / "0.jpg").read_bytes()
    (root / "roses" / "cut.jpg").write_bytes(raw[: len(raw) // 3])
    (root / "roses" / "random.jpg").write_bytes(np.random.default_rng(1).bytes(4000))
    (root / "roses" / "zero.jpg").write_bytes(b"")
    (root / "LICENSE.txt").write_text("license")
    (root / "daisy" / ".DS_Store").write_bytes(b"\0\0")
    (root / "daisy" / "notes.txt").write_text("x")
    (root / "daisy" / "nested").mkdir()
    write_good(root / "daisy" / "nested" / "deep.jpg")
    return root


@pytest.mark.parametrize("setup,needle", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is not a directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "has no class subfolders"),
    (lambda p: write_good(p / "one" / "daisy" / "a.jpg") or p / "one", "only one class folder"),
    (lambda p: (make_folder(p / "hole"), (p / "hole" / "tulips").mkdir()) and p / "hole", "tulips/ has no images"),
])
def test_bad_data_dir_is_one_line_exit_3(tmp_path, setup, needle):
    path = setup(tmp_path)
    res = cli("train", "--data-dir", str(path), "--epochs", "1", "--quiet")
    assert res.returncode == 3, res.stderr
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "--data-dir" in lines[0] and needle in lines[0]
    assert "Traceback" not in res.stderr


def test_discovery_keeps_only_images_directly_in_class_folders(messy):
    ds = data.discover(messy)
    names = {Path(f).name for f in ds.files}
    assert "deep.jpg" not in names and "notes.txt" not in names and ".DS_Store" not in names
    assert {"png_named.jpg", "gray.jpg", "cmyk.jpg", "tiny.jpg", "cut.jpg"} <= names
    assert any(p.endswith("LICENSE.txt") for p in ds.ignored)


def test_both_loaders_skip_and_count_undecodable_files(messy):
    ds = data.discover(messy)
    cfg = RunConfig(image_size=64)
    seen = {Path(p.decode()).name: im for im, _, p in
            pipeline.decode_dataset(ds.files, ds.labels, cfg, with_path=True).as_numpy_iterator()}
    assert {"random.jpg", "zero.jpg"}.isdisjoint(seen)
    for name in ("png_named.jpg", "gray.jpg", "cmyk.jpg", "tiny.jpg", "cut.jpg"):  # odd but valid: become RGB
        assert seen[name].shape == (64, 64, 3) and seen[name].dtype == np.uint8
    _, kept, skipped = baseline.load_images(ds.files, 64, progress=False)
    assert {Path(s).name for s in skipped} == {"random.jpg", "zero.jpg"}
    assert len(kept) + len(skipped) == len(ds.files)
    # Both keep the same files: the cut JPEG decodes as far as it goes in each (the rest grey).
    assert {Path(ds.files[k]).name for k in kept} == set(seen)


@pytest.mark.parametrize("seed", range(3))
def test_fuzz_generated_bad_images_never_crash_either_loader(tmp_path, seed):
    rng = np.random.default_rng(seed)
    good = cv2.imencode(".jpg", synthetic.render(1, rng))[1].tobytes()
    files = []
    for i in range(12):
        kind = i % 4
        blob = {0: good, 1: rng.bytes(int(rng.integers(0, 3000))), 2: good[: int(rng.integers(1, len(good)))],
                3: good[:200] + rng.bytes(500) + good[700:]}[kind]
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(blob)
        files.append(str(path))
    cfg = RunConfig(image_size=32)
    out = list(pipeline.decode_dataset(files, [0] * len(files), cfg, with_path=True).as_numpy_iterator())
    assert 3 <= len(out) <= len(files)  # the good ones always come through
    _, kept, skipped = baseline.load_images(files, 32, progress=False)
    assert len(kept) + len(skipped) == len(files) and len(kept) >= 3


@pytest.mark.slow
def test_tfdata_run_reports_skips_and_strict_makes_them_an_error(messy, tiny_cfg, cache):
    cfg = tiny_cfg(data_dir=str(messy), dataset="flowers", epochs=1, batch_size=8)
    row = train.run(cfg, cache, progress=False).row
    assert row["skipped_files"] == 2
    assert {Path(p).name for p in row["skipped_list"].split(";")} == {"random.jpg", "zero.jpg"}
    assert row["train_images"] + row["test_images"] == len(data.discover(messy).files) - 2
    with pytest.raises(DataError, match="cannot be decoded"):
        train.run(cfg.replace(strict=True), cache, progress=False)


@pytest.mark.parametrize("make,code,needle", [
    (lambda p: str(p / "nope"), 4, "no such file or folder"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), 4, "not a SavedModel"),
    (lambda p: "http://127.0.0.1:9/model", 6, "--model-handle PATH"),
])
def test_bad_model_handle(tmp_path, make, code, needle):
    res = cli("train", "--model-handle", make(tmp_path), "--num-images", "20", "--image-size", "96", "--quiet")
    assert res.returncode == code, res.stderr
    assert needle in res.stderr and "--model-handle" in res.stderr and "Traceback" not in res.stderr


def test_classifier_handle_is_rejected_as_wrong_output(tmp_path):
    from flowers_fast.hubexport import export_random_classifier

    path = export_random_classifier(tmp_path / "clf", image_size=96)
    res = cli("train", "--model-handle", str(path), "--num-images", "20", "--image-size", "96", "--quiet")
    assert res.returncode == 4 and "feature_vector" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args,code,needle", [
    (["train", "--device", "gpu"], 7, "--device gpu"),
    (["train", "--batch-size", "0"], 2, "--batch-size"),
    (["train", "--batch-size", "-4"], 2, "--batch-size"),
    (["train", "--epochs", "0"], 2, "--epochs"),
    (["train", "--pipeline", "fast"], 2, "--pipeline"),
])
def test_bad_flags(args, code, needle):
    res = cli(*args, env={"CUDA_VISIBLE_DEVICES": "-1"})
    assert res.returncode == code, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
