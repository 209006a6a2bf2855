"""Data discovery, the one train/test split, the synthetic set, and the two input pipelines
(naive OpenCV vs tf.data) agreeing on pixels, labels and files."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from flowers_fast import baseline, data, pipeline, synthetic
from flowers_fast.config import RunConfig
from flowers_fast.errors import DataError, UserError

SIZE = 96
FLOWER_CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


@pytest.fixture(scope="module")
def synth(cache):
    """A 40-image synthetic set (8 per class) in the session cache, discovered."""
    return data.resolve(RunConfig(num_images=40, image_size=SIZE), cache)


def _decode_tf(files, labels, cfg):
    out = list(pipeline.decode_dataset(files, labels, cfg).as_numpy_iterator())
    return np.stack([img for img, _ in out]), np.array([lab for _, lab in out])


# --- tf.data vs naive: same pixels, same labels -------------------------------------------------

def test_tfdata_and_naive_decode_the_same_pixels_after_channel_swap(synth):
    # Every class and several frame sizes (landscape and portrait), all downscaled to 96.
    files, labels = synth.files[::3], synth.labels[::3]
    cfg = RunConfig(image_size=SIZE)
    tf_imgs, tf_labels = _decode_tf(files, labels, cfg)
    rgb, kept_rgb, skipped_rgb = baseline.load_images(files, SIZE, rgb=True, progress=False)
    bgr, kept_bgr, skipped_bgr = baseline.load_images(files, SIZE, progress=False)

    assert tf_imgs.dtype == rgb.dtype == bgr.dtype == np.uint8
    assert tf_imgs.shape == rgb.shape == bgr.shape == (len(files), SIZE, SIZE, 3)
    assert skipped_rgb == skipped_bgr == []
    assert list(kept_rgb) == list(kept_bgr) == list(range(len(files)))
    # Same labels: tf.data passes them through in order; naive takes dataset labels at kept rows.
    assert list(tf_labels) == list(np.asarray(labels)[kept_rgb])

    # rgb=True is exactly the default BGR output with the channels reversed.
    np.testing.assert_array_equal(bgr[..., ::-1], rgb)

    # After the swap, both pipelines see the same image up to decoder/resize rounding.
    diff = np.abs(tf_imgs.astype(np.int16) - rgb.astype(np.int16))
    assert diff.mean() < 2.0, f"mean abs diff {diff.mean():.3f}"
    assert diff.max() <= 16, f"max abs diff {diff.max()}"
    per_image = diff.reshape(len(files), -1).mean(axis=1)
    assert per_image.max() < 2.0, f"per-image mean abs diff {per_image}"

    # Without the swap (the notebook's BGR) the pixels differ clearly.
    bgr_diff = np.abs(tf_imgs.astype(np.int16) - bgr.astype(np.int16))
    assert bgr_diff.mean() > 20.0, f"BGR vs RGB mean abs diff only {bgr_diff.mean():.3f}"


# --- the split -----------------------------------------------------------------------------------

def _fake_folder(n: int, classes: int = 5) -> data.ImageFolder:
    names = tuple(f"c{k}" for k in range(classes))
    files = tuple(f"/nowhere/c{i % classes}/{i:05d}.jpg" for i in range(n))
    order = sorted(range(n), key=lambda i: files[i])
    files = tuple(files[i] for i in order)
    labels = tuple(int(Path(f).parent.name[1:]) for f in files)
    return data.ImageFolder("/nowhere", names, files, labels, "folder")


@pytest.mark.parametrize("n, fraction", [(2, 0.25), (10, 0.25), (37, 0.25), (200, 0.25), (3670, 0.25),
                                         (37, 0.2), (11, 0.5)])
def test_split_sizes_disjoint_and_covering(n, fraction):
    ds = _fake_folder(n)
    s = data.split(ds, fraction, seed=0)
    n_test = math.ceil(fraction * n)  # sklearn's train_test_split(test_size=fraction)
    assert len(s.test_idx) == n_test
    assert len(s.train_idx) == n - n_test
    assert set(s.train_idx).isdisjoint(s.test_idx)
    assert sorted(s.train_idx + s.test_idx) == list(range(n))
    # Files and labels are the dataset's at those positions, in the same order.
    assert s.train_files == tuple(ds.files[i] for i in s.train_idx)
    assert s.test_files == tuple(ds.files[i] for i in s.test_idx)
    assert s.train_labels == tuple(ds.labels[i] for i in s.train_idx)
    assert s.test_labels == tuple(ds.labels[i] for i in s.test_idx)
    assert all(isinstance(i, int) for i in s.train_idx + s.test_idx + s.train_labels + s.test_labels)


def test_split_is_deterministic_and_changes_with_seed():
    ds = _fake_folder(200)
    a, b = data.split(ds, 0.25, seed=0), data.split(ds, 0.25, seed=0)
    assert a == b
    other = data.split(ds, 0.25, seed=1)
    assert other.test_idx != a.test_idx
    assert set(other.test_idx) != set(a.test_idx)
    # Shuffled, not a slice of the sorted list.
    assert sorted(a.test_idx) != list(range(len(a.test_idx)))
    # A second discovery of the same folder splits identically too.
    assert data.split(_fake_folder(200), 0.25, seed=0) == a


def test_split_rejects_too_few_images():
    with pytest.raises(DataError, match="leave 0 for training.*--test-fraction"):
        data.split(_fake_folder(1, classes=1), 0.25, seed=0)


def test_both_pipelines_train_and_test_on_the_same_files(synth):
    s = data.split(synth, 0.25, seed=0)
    assert data.split(synth, 0.25, seed=0) == s
    cfg = RunConfig(image_size=SIZE, num_images=len(synth))

    # naive: the notebook's arrays, split by split.train_idx / test_idx.
    X_train, y_train, X_test, y_test, skipped = baseline.prepare(synth, s, SIZE, rgb=True, progress=False)
    assert skipped == []
    assert list(y_train) == list(s.train_labels)
    assert list(y_test) == list(s.test_labels)
    ref_train, _, _ = baseline.load_images(s.train_files, SIZE, rgb=True, progress=False)
    ref_test, _, _ = baseline.load_images(s.test_files, SIZE, rgb=True, progress=False)
    assert X_train.dtype == np.float64 and X_train.max() <= 1.0
    np.testing.assert_array_equal(np.rint(X_train * 255).astype(np.uint8), ref_train)
    np.testing.assert_array_equal(np.rint(X_test * 255).astype(np.uint8), ref_test)

    # tf.data: the datasets train.run builds, from split.train_files / test_files.
    dec = pipeline.prepare(cfg, s, progress=False)
    assert (dec.n_train, dec.n_test, dec.skipped) == (len(s.train_files), len(s.test_files), [])
    for dec, X, y in ((dec.train, X_train, y_train), (dec.test, X_test, y_test)):
        got = list(dec.as_numpy_iterator())
        assert [int(lab) for _, lab in got] == list(y)
        images = np.stack([img for img, _ in got]).astype(np.float64)
        # Same files in the same order: each tf.data image is close to its naive row ...
        per_image = np.abs(images - X * 255).reshape(len(got), -1).mean(axis=1)
        assert per_image.max() < 2.0
        # ... and clearly different from the other rows (so the order really matters).
        assert np.abs(images - np.roll(X * 255, 1, axis=0)).mean() > 10.0


# --- the synthetic set ---------------------------------------------------------------------------

def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_synthetic_is_deterministic_per_seed_and_index(tmp_path):
    a = _bytes(synthetic.generate(tmp_path / "a", 6, seed=0))
    b = _bytes(synthetic.generate(tmp_path / "b", 6, seed=0))
    assert len(a) == 6
    assert a == b
    # Image i depends on (seed, i) only: a smaller set is a prefix of a bigger one.
    small = _bytes(synthetic.generate(tmp_path / "small", 3, seed=0))
    assert small == {k: v for k, v in a.items() if k in small} and len(small) == 3
    # Another seed: same file names, different images.
    c = _bytes(synthetic.generate(tmp_path / "c", 6, seed=1))
    assert c.keys() == a.keys()
    assert all(c[k] != a[k] for k in a)


def test_synthetic_classes_and_image_sizes(synth):
    assert synth.kind == "synthetic"
    assert synth.classes == FLOWER_CLASSES
    assert sorted(set(synth.labels)) == [0, 1, 2, 3, 4]
    assert all(synth.labels.count(k) == 8 for k in range(5))
    for f, label in zip(synth.files, synth.labels):
        assert Path(f).parent.name == FLOWER_CLASSES[label]
    sizes = []
    for f in synth.files:
        img = cv2.imread(f)
        assert img is not None and img.ndim == 3 and img.shape[2] == 3
        h, w = img.shape[:2]
        assert 240 <= w <= 500 and 240 <= h <= 500, (f, w, h)
        sizes.append((w, h))
    # A mix like the real set: several frames, landscape and portrait.
    assert len(set(sizes)) >= 3
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)


# --- discovery -----------------------------------------------------------------------------------

def _jpeg(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), value, np.uint8))
    assert ok
    path.write_bytes(buf.tobytes())


def test_discover_skips_non_images_and_sorts(tmp_path):
    root = tmp_path / "flower_photos"
    # Created out of order on purpose.
    _jpeg(root / "tulips" / "b.jpg")
    _jpeg(root / "tulips" / "a.JPG")
    (root / "tulips" / "notes.txt").write_text("not an image\n")
    (root / "tulips" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _jpeg(root / "daisy" / "z.jpeg")
    _jpeg(root / "daisy" / "10.png")
    _jpeg(root / "daisy" / "2.jpg")
    for k in (7, 3, 9, 1, 5):  # enough files that directory order is unlikely to be sorted by chance
        _jpeg(root / "roses" / f"r{k}.jpg")
    (root / "LICENSE.txt").write_text("CC-BY\n")

    ds = data.discover(root)
    assert ds.classes == ("daisy", "roses", "tulips")
    names = [str(Path(f).relative_to(root)) for f in ds.files]
    assert names == ["daisy/10.png", "daisy/2.jpg", "daisy/z.jpeg", "roses/r1.jpg", "roses/r3.jpg", "roses/r5.jpg",
                     "roses/r7.jpg", "roses/r9.jpg", "tulips/a.JPG", "tulips/b.jpg"]
    assert ds.labels == (0, 0, 0, 1, 1, 1, 1, 1, 2, 2)
    assert len(ds) == 10
    assert all(Path(f).is_file() for f in ds.files)
    for junk in ("LICENSE.txt", "notes.txt", ".DS_Store"):
        assert not any(Path(f).name == junk for f in ds.files)
    ignored = {Path(p).name for p in ds.ignored}
    assert {"LICENSE.txt", "notes.txt"} <= ignored


@pytest.mark.parametrize("content", ["empty", "only_non_images"])
def test_discover_rejects_class_folder_without_images(tmp_path, content):
    _jpeg(tmp_path / "daisy" / "1.jpg")
    _jpeg(tmp_path / "roses" / "1.jpg")
    (tmp_path / "tulips").mkdir()
    if content == "only_non_images":
        (tmp_path / "tulips" / "notes.txt").write_text("x")
        (tmp_path / "tulips" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(DataError) as info:
        data.discover(tmp_path)
    assert "tulips" in str(info.value)
    assert "\n" not in str(info.value)


def test_discover_rejects_missing_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        data.discover(tmp_path / "nope")
    assert "--data-dir" in str(info.value)


def test_discover_rejects_a_file(tmp_path):
    f = tmp_path / "flower_photos.tgz"
    f.write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="not a directory"):
        data.discover(f)


def test_discover_rejects_single_class(tmp_path):
    _jpeg(tmp_path / "daisy" / "1.jpg")
    _jpeg(tmp_path / "daisy" / "2.jpg")
    with pytest.raises(DataError, match="daisy"):
        data.discover(tmp_path)


def test_discover_rejects_no_class_folders(tmp_path):
    _jpeg(tmp_path / "loose.jpg")
    with pytest.raises(DataError):
        data.discover(tmp_path)


def test_data_errors_are_user_errors_with_exit_code_3():
    assert issubclass(DataError, UserError)
    assert DataError.exit_code == 3


@pytest.mark.parametrize("rates,stage,fraction,limit", [
    ((210, 900, 300), "backbone", 0.70, "shared cores"),  # near the two stages taking turns (225 img/s)
    ((90, 1800, 250), "backbone", 0.36, "not the stages' rates"),  # below that too: something else
    ((230, 1800, 250), "backbone", 0.92, ""),  # within 0.8 of the slower stage: nothing to say
    ((150, 160, 900), "input", 0.94, ""),
])
def test_feature_pass_bound_names_the_slower_stage_and_what_limits_the_pass(rates, stage, fraction, limit):
    from flowers_fast import metrics

    out = metrics.pass_bound(*rates, cores=2)
    assert out["feature_pass_bound_stage"] == stage
    assert out["feature_pass_bound_fraction"] == pytest.approx(fraction, abs=0.005)
    assert out["feature_pass_shared_cores_img_s"] == pytest.approx(1 / (1 / rates[1] + 1 / rates[2]))
    assert out["feature_pass_limit"].startswith(limit) and bool(out["feature_pass_limit"]) == bool(limit)


def test_input_only_rate_leaves_out_the_first_batch():
    import time

    import tensorflow as tf

    from flowers_fast import metrics

    def slow_first():
        for i in range(5):
            if i == 0:
                time.sleep(0.5)  # the iterator's start-up
            yield np.zeros((10, 2), np.float32)

    ds = tf.data.Dataset.from_generator(slow_first, output_signature=tf.TensorSpec((10, 2), tf.float32))
    assert metrics.input_only_rate(ds, 10) > 40 / 0.5  # 40 images after the first, in far less than 0.5 s
    assert metrics.input_only_rate(ds.take(1), 10) < 10 / 0.5  # one batch: its start-up counts


@pytest.mark.parametrize("autotune", [False, True])
def test_feature_stream_runs_without_the_autotuner_unless_asked(autotune):
    cfg = RunConfig(pipeline="featcache", stream_autotune=autotune)
    stream = pipeline.feature_stream(["a/x.jpg", "b/y.jpg"], np.zeros(2, np.int32), cfg, 2)
    assert stream.options().autotune.enabled is autotune
    # The training pipeline keeps its autotuner either way.
    assert pipeline.options(cfg, training=True).autotune.enabled
