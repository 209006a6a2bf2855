"""The tf.data input pipeline, and the TensorFlow tutorial's way as a peer.

Ours: parallel read + decode + resize (AUTOTUNE), cache the decoded uint8 images, shuffle
after the cache, batch, prefetch. Images stay uint8 (4x less memory and host-to-device
traffic than float32) and are scaled inside the model. RGB throughout.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import data
from .config import RunConfig
from .errors import DataError, OutputError
from .tfkeras import keras, tf

AUTOTUNE = tf.data.AUTOTUNE


def _is_jpeg(raw):
    return tf.equal(tf.strings.substr(raw, 0, 3), b"\xff\xd8\xff")  # the signature decode_image checks


def _decode_jpeg(raw, ratio: int = 1):
    # A truncated JPEG (a copy cut short) decodes as far as it goes, the rest grey, as in
    # cv2.imread: both pipelines then keep the same files. A file without image data still fails.
    return tf.io.decode_jpeg(raw, channels=3, ratio=ratio, try_recover_truncated=True, acceptable_fraction=0.0)


# EXIF orientation 1..8 -> (transpose, mirror top-bottom, mirror left-right), applied in that order.
_TURNS = tuple(tuple(bool(int(b)) for b in t) for t in ("000", "001", "011", "010", "100", "101", "111", "110"))


def orient(image, orientation):
    """Pixels turned upright as EXIF ``orientation`` (1..8, from ``data.exif_orientations``) says,
    as cv2.imread does for the naive pipeline. Three plain conds: about half the CPU cost of one
    8-way switch_case, measured."""
    turn = tf.gather(tf.constant(_TURNS, tf.bool), tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7))
    image = tf.cond(turn[0], lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
    image = tf.cond(turn[1], lambda: tf.reverse(image, [0]), lambda: image)
    image = tf.cond(turn[2], lambda: tf.reverse(image, [1]), lambda: image)
    image.set_shape([None, None, 3])
    return image


def decode_any(raw):
    """Image file bytes (JPEG, PNG, BMP, GIF, WebP) -> uint8 RGB [H, W, 3] as stored; grayscale,
    CMYK, 16-bit and alpha become 8-bit RGB."""
    image = tf.cond(_is_jpeg(raw), lambda: _decode_jpeg(raw),
                    lambda: tf.io.decode_image(raw, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def decode_upright(raw, orientation: int = 1):
    """``decode_any`` turned upright by EXIF ``orientation``: what ``predict`` feeds the model."""
    image = decode_any(raw)
    return image if orientation == 1 else orient(image, orientation)


def _decode(raw, image_size: int, dct: bool, orientation=None):
    """JPEG/PNG/BMP/GIF bytes -> uint8 RGB [size, size, 3], upright when ``orientation`` (a tensor)
    is given; grayscale and CMYK become RGB."""
    if dct:
        # JPEGs at least 2x (4x, 8x) the target decode at reduced size in the DCT: less work.
        def jpeg():
            shape = tf.image.extract_jpeg_shape(raw)
            smallest = tf.reduce_min(shape[:2])
            return tf.case([(smallest >= 8 * image_size, lambda: _decode_jpeg(raw, 8)),
                            (smallest >= 4 * image_size, lambda: _decode_jpeg(raw, 4)),
                            (smallest >= 2 * image_size, lambda: _decode_jpeg(raw, 2))],
                           default=lambda: _decode_jpeg(raw))

        def other():
            return tf.io.decode_image(raw, channels=3, expand_animations=False)

        image = tf.cond(_is_jpeg(raw), jpeg, other)
        image.set_shape([None, None, 3])
    else:
        image = decode_any(raw)
    # Bilinear without antialias, like cv2.INTER_LINEAR, so both pipelines see the same pixels.
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=False)
    if orientation is not None:
        # Turned after the resize to a square, which gives the same pixels as before it (the
        # resize is separable and symmetric), on a smaller image than a phone's photo.
        image = orient(image, orientation)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def file_bytes(files) -> list[bytes]:
    """File names as TensorFlow must get them: the OS's bytes. (A str holding a name that is not
    UTF-8, as os.listdir gives it, cannot become a tf.string.) ``path_str`` turns them back."""
    return [os.fsencode(f) for f in files]


def path_str(path: bytes) -> str:
    """A path that came out of a dataset, as the str ``data.discover`` listed."""
    return os.fsdecode(path)


def decode_dataset(files, labels, cfg: RunConfig, with_path: bool = False, orientations=None,
                   skip_bad: bool = True) -> "tf.data.Dataset":
    """(path, label) -> (uint8 image, label[, path as bytes]), in parallel; undecodable files are
    dropped (``skip_bad=False``: they stop the iteration with TensorFlow's error instead).

    ``orientations``: each file's EXIF orientation (read here when not given). Dropped files are
    counted by the caller (compare what came out with what went in)."""
    files, labels = list(files), list(labels)
    if orientations is None:
        orientations = data.exif_orientations(files)
    if any(o != 1 for o in orientations):
        ds = tf.data.Dataset.from_tensor_slices((file_bytes(files), labels, list(orientations)))
    else:  # nothing to turn (the usual case): no orientation ops at all, so no cost
        ds = tf.data.Dataset.from_tensor_slices((file_bytes(files), labels))

    def load(path, label, orientation=None):
        image = _decode(tf.io.read_file(path), cfg.image_size, cfg.dct_decode, orientation)
        return (image, label, path) if with_path else (image, label)

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    # A corrupt or truncated file must not kill an epoch: drop it here, count it in the first pass.
    return ds.ignore_errors() if skip_bad else ds


@dataclass
class Decoded:
    """The train and test images decoded and cached once: (uint8 image, label) datasets, the
    counts kept, the files that could not be decoded, and the seconds it took."""

    train: "tf.data.Dataset"
    test: "tf.data.Dataset"
    n_train: int
    n_test: int
    skipped: list
    seconds: float
    oriented: int = 0  # files turned upright by their EXIF orientation


def prepare(cfg: RunConfig, split, progress: bool) -> Decoded:
    """Decode, resize and cache both parts of the split in one first pass each, which also finds
    the undecodable files (a DataError with --strict, or when a part keeps no image)."""
    start = time.perf_counter()
    out, counts, skipped, oriented = [], [], [], 0
    for part, files, labels in (("train", split.train_files, split.train_labels),
                                ("test", split.test_files, split.test_labels)):
        orientations = data.exif_orientations(files)  # timed: reading the headers is part of the pipeline
        oriented += sum(o != 1 for o in orientations)
        decoded = cached(decode_dataset(files, labels, cfg, with_path=True, orientations=orientations), cfg, part)
        part_skipped = _first_pass(decoded, files, cfg.strict, progress, part)
        skipped += part_skipped
        counts.append(len(files) - len(part_skipped))
        if cfg.cache == "none":
            # Nothing cached: every epoch reads the files again. Only those that decoded, and with
            # errors kept, so a file deleted mid-run stops the run (train.py names it) instead of
            # silently shrinking the epochs.
            dropped = set(part_skipped)
            keep = [i for i, f in enumerate(files) if f not in dropped]
            decoded = decode_dataset([files[i] for i in keep], [labels[i] for i in keep], cfg, with_path=True,
                                     orientations=[orientations[i] for i in keep], skip_bad=False)
        out.append(decoded.map(lambda image, label, path: (image, label)))
    return Decoded(out[0], out[1], counts[0], counts[1], skipped, time.perf_counter() - start, oriented)


def _first_pass(decoded, files, strict: bool, progress: bool, label: str) -> list[str]:
    """Iterate the (image, label, path) dataset once: fills the cache and finds undecodable files."""
    seen = set()
    for _, _, paths in tqdm(decoded.batch(256), desc=f"{label}: decode+cache", unit="batch", disable=not progress,
                            leave=False):
        seen.update(path_str(p) for p in paths.numpy())
    return undecodable(files, seen, strict, label)


def undecodable(files, seen, strict: bool, part: str) -> list[str]:
    """The files of the split's ``part`` (train or test) that did not come out of a decode pass
    (``seen``: the paths that did): a DataError when some no longer exist, with --strict, or when
    none decoded."""
    skipped = sorted(set(files) - set(seen))
    missing = data.gone(skipped)
    if missing:  # deleted since discovery: not bad images
        raise data.gone_error(missing)
    if skipped and strict:
        raise DataError(f"{skipped[0]}: cannot be decoded as an image ({len(skipped)} such files); remove them or "
                        "drop --strict to skip them")
    if not seen:
        raise data.no_images_left(part, skipped)
    return skipped


def options(cfg: RunConfig, training: bool, autotune: bool = True) -> "tf.data.Options":
    """``autotune=False``: AUTOTUNE parallelism runs at one call per core, without the autotuner."""
    opts = tf.data.Options()
    opts.autotune.enabled = autotune
    if training:
        opts.deterministic = cfg.deterministic
    if cfg.private_threads:
        opts.threading.private_threadpool_size = cfg.private_threads
    return opts


_file_cache: Path | None = None


def _file_cache_folder() -> Path:
    """This process's own folder for --cache file, removed at exit: tf.data reuses a complete cache
    file it finds, so a folder shared between runs would feed one run another's images."""
    global _file_cache
    if _file_cache is None:
        parent = os.environ.get("FLOWERS_FAST_TFDATA_CACHE") or None
        try:
            if parent:
                Path(parent).mkdir(parents=True, exist_ok=True)
            _file_cache = Path(tempfile.mkdtemp(prefix="flowers_fast_tfdata_", dir=parent))
        except OSError as exc:
            raise OutputError(f"--cache file: cannot create a cache folder in {parent or tempfile.gettempdir()} "
                              f"({exc.strerror or exc}); set FLOWERS_FAST_TFDATA_CACHE to a writable folder or use "
                              "--cache memory") from None
        atexit.register(shutil.rmtree, _file_cache, True)
    return _file_cache


def cached(ds: "tf.data.Dataset", cfg: RunConfig, tag: str) -> "tf.data.Dataset":
    """Cache after decode+resize and before shuffle: later epochs skip the decode entirely."""
    if cfg.cache == "memory":
        return ds.cache()
    if cfg.cache == "file":
        return ds.cache(str(_file_cache_folder() / tag))
    return ds


def train_dataset(decoded: "tf.data.Dataset", cfg: RunConfig, batch_size: int) -> "tf.data.Dataset":
    ds = decoded.shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE).with_options(options(cfg, training=True))


def eval_dataset(decoded: "tf.data.Dataset", cfg: RunConfig, batch_size: int) -> "tf.data.Dataset":
    return decoded.batch(batch_size).prefetch(AUTOTUNE).with_options(options(cfg, training=False))


def feature_stream(files, labels, cfg: RunConfig, batch_size: int, augment=None) -> "tf.data.Dataset":
    """featcache's one-time pass: (uint8 images, labels, paths) batches decoded on the fly, in file
    order. No cache: each image is read once, so a cache would only cost memory; parallel decode
    and prefetch overlap decoding with the backbone, and memory holds a few batches, not the set.

    ``augment`` (a Keras augmentation on [0, 1] images): each image becomes ``cfg.augment_views``
    augmented views in a row, decoded once (--augment-views)."""
    ds = decode_dataset(files, labels, cfg, with_path=True)
    if augment is not None:
        ds = _views(ds, augment, cfg.augment_views)
    # Two batches ahead keep the backbone fed (decoding is several times faster on a CPU) and put a
    # fixed bound on what waits in memory.
    # Without the autotuner by default (--stream-autotune): while the backbone held both cores, its
    # tuning left the pass in a mode at half the rate, in some passes and not others.
    return ds.batch(batch_size).prefetch(2).with_options(options(cfg, training=False, autotune=cfg.stream_autotune))


def _views(ds, augment, views: int, batch: int = 16) -> "tf.data.Dataset":
    """Each (image, label, path) -> ``views`` augmented copies of it in a row (uint8, as the engines
    take images). ``batch`` images at a time: the augmentation's ops run vectorised (one image at a
    time bound the pass at about 120 views/s on 2 cores); sequential, so that its random state runs in
    one order and a seed repeats."""
    def k_views(images, labels, paths):
        x = tf.repeat(tf.cast(images, tf.float32) / 255.0, views, axis=0)
        out = tf.cast(tf.round(tf.clip_by_value(augment(x, training=True) * 255.0, 0.0, 255.0)), tf.uint8)
        return out, tf.repeat(labels, views), tf.repeat(paths, views)

    return ds.batch(batch).map(k_views).unbatch()


def feature_datasets(f_train, y_train, f_test, y_test, cfg: RunConfig, batch_size: int, views: int = 0):
    """featcache's head training data: in-memory features, shuffled each epoch, batched.
    ``views``: ``f_train`` holds that many views of each image (axis 1), and each epoch trains on
    one of each image's, drawn afresh (seeded)."""
    train = tf.data.Dataset.from_tensor_slices((f_train, y_train)).shuffle(len(f_train), seed=cfg.seed)
    if views:
        draws = tf.data.Dataset.random(seed=cfg.seed, rerandomize_each_iteration=True)
        train = tf.data.Dataset.zip(train, draws).map(
            lambda pair, r: (tf.gather(pair[0], tf.cast(r % views, tf.int32)), pair[1]))
    test = tf.data.Dataset.from_tensor_slices((f_test, y_test))
    return train.batch(batch_size).prefetch(AUTOTUNE), test.batch(batch_size)


def tutorial_datasets(split, classes, cfg: RunConfig, batch_size: int, workdir: Path):
    """TensorFlow's transfer-learning tutorial: ``image_dataset_from_directory`` +
    ``.cache().prefetch(AUTOTUNE)`` (float32 0..255 images, Rescaling in the model).

    It reads a directory, so our split is laid out as symlinked class folders to keep the
    same train/test files as every other configuration. The links have short ASCII names (class
    index, file index, the file's extension), so any name the OS accepts works: one near its
    length limit, or not UTF-8, which TensorFlow's directory listing cannot take."""
    out = []
    folders = [f"{k:04d}" for k in range(len(classes))]  # in class order: the labels stay the same
    for part, files, labels in (("train", split.train_files, split.train_labels),
                                ("test", split.test_files, split.test_labels)):
        root = Path(workdir) / part
        for name in folders:
            (root / name).mkdir(parents=True, exist_ok=True)
        for i, (f, label) in enumerate(zip(files, labels)):
            link = root / folders[label] / f"{i:06d}{Path(f).suffix.lower()}"
            if not link.exists():
                os.symlink(os.path.abspath(f), link)
        ds = keras.utils.image_dataset_from_directory(
            str(root), labels="inferred", label_mode="int", class_names=folders,
            image_size=(cfg.image_size, cfg.image_size), batch_size=batch_size,
            shuffle=(part == "train"), seed=cfg.seed)
        out.append(ds.cache().prefetch(AUTOTUNE))
    return out[0], out[1]
