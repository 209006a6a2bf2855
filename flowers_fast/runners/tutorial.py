"""TensorFlow's tutorial: ``image_dataset_from_directory``, cache, prefetch, then fit."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from .. import data, pipeline, train
from ..errors import DataError
from ..tfkeras import tf


def run(ctx: train.RunContext) -> train.RunResult:
    cfg, split = ctx.cfg, ctx.split
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowers_fast_tutorial_") as work:
        train_ds, test_ds = pipeline.tutorial_datasets(split, ctx.dataset.classes, cfg, ctx.global_batch, Path(work))
        # Fill the cache (the tutorial's first epoch would); counts as data preparation.
        try:
            with train._files_stay(ctx):
                n_train = sum(int(tf.shape(x)[0]) for x, _ in train_ds)
                n_test = sum(int(tf.shape(x)[0]) for x, _ in test_ds)
        except tf.errors.InvalidArgumentError:
            # The tutorial's loader stops at the first undecodable file (ours skips and counts);
            # TensorFlow does not say which file, so find them.
            raise _tutorial_decode_error(ctx.dataset, split.train_files + split.test_files) from None
        prep = time.perf_counter() - start
        # TF's loader uses the pixels as stored: EXIF orientation ignored, unlike cv2 and our tf.data.
        train._record_prep(ctx, prep, n_train, n_test, [], "RGB", exif="ignored")
        ctx.row["skipped_files"] = len(split.train_files) + len(split.test_files) - n_train - n_test
        return train._train_on_datasets(ctx, train_ds, test_ds, n_train, n_test, prep, "float255")


def _tutorial_decode_error(dataset: data.ImageFolder, files) -> DataError:
    """Which of ``files`` the tutorial's loader (``tf.io.decode_image``) cannot decode, as one
    error (a class none of whose images decode is named as that)."""
    bad = []
    for path in files:
        try:
            tf.io.decode_image(tf.io.read_file(os.fsencode(path)), channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError):
            bad.append(path)
    data.check_classes(dataset, bad)
    first = bad[0] if bad else "an image"
    return DataError(f"{first}: cannot be decoded as an image by the tutorial's loader ({len(bad)} such files), "
                     "which stops at them; remove them, or use --pipeline tfdata, which skips and counts them")
