"""The notebook's naive recipe, kept faithful on purpose: it is the baseline we measure against.

``cv2.imread`` every file (BGR unless ``rgb``), ``cv2.resize`` to 224x224, one big NumPy
array, the split by fancy indexing (copies), ``/255`` to float64, then ``model.fit`` on the
arrays. Nothing else in the package imports these shortcuts.
"""

from __future__ import annotations

import cv2
import numpy as np
from tqdm import tqdm

import os

from .data import gone_error, no_images_left
from .errors import DataError


def imread(path: str):
    """``cv2.imread(path)``, the notebook's call, for any name the OS accepts. OpenCV takes the
    name as UTF-8 (one that is not crashes it), so such a file is opened here and OpenCV reads it
    through /proc/self/fd (the same decoder: a cut JPEG decodes as far as it goes, which
    ``cv2.imdecode`` refuses); elsewhere, from its bytes."""
    try:
        path.encode("utf-8")
        return cv2.imread(path)
    except UnicodeEncodeError:  # bytes kept as surrogate escapes by os.listdir
        pass
    try:
        fd = os.open(os.fsencode(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.path.isdir("/proc/self/fd"):
            return cv2.imread(f"/proc/self/fd/{fd}")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = np.frombuffer(f.read(), np.uint8)
        return cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    finally:
        os.close(fd)


def load_images(files, image_size: int = 224, rgb: bool = False, progress: bool = True, strict: bool = False):
    """Returns (uint8 array [n, size, size, 3], kept indices, skipped file paths)."""
    images, kept, skipped = [], [], []
    for i, path in enumerate(tqdm(files, desc="naive: cv2.imread", unit="img", disable=not progress,
                                  leave=False)):
        img = imread(str(path))  # BGR, like the notebook; None when OpenCV can't decode it
        if img is None:
            if not os.path.exists(path):  # deleted since discovery: not a bad image
                raise gone_error([str(path)])
            if strict:
                raise DataError(f"{path}: cannot be decoded as an image; remove it or drop --strict to skip it")
            skipped.append(str(path))
            continue
        if rgb:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        images.append(cv2.resize(img, (image_size, image_size)))
        kept.append(i)
    if not images:
        raise DataError(f"{skipped[0]}: cannot be decoded as an image, nor can any of the other {len(skipped) - 1} "
                        "files; replace or remove them, or add images")
    return np.array(images), np.array(kept), skipped


def prepare(dataset, split, image_size: int = 224, rgb: bool = False, progress: bool = True, strict: bool = False):
    """The notebook's arrays: (X_train_scaled, y_train, X_test_scaled, y_test, skipped)."""
    X, kept, skipped = load_images(dataset.files, image_size, rgb, progress, strict)
    y = np.array(dataset.labels)[kept]
    position = {int(k): j for j, k in enumerate(kept)}  # dataset index -> row of X
    train_rows = [position[i] for i in split.train_idx if i in position]
    test_rows = [position[i] for i in split.test_idx if i in position]
    for part, rows, files in (("train", train_rows, split.train_files), ("test", test_rows, split.test_files)):
        if not rows:  # Keras would stop with "Expected input data to be non-empty"
            raise no_images_left(part, list(files))
    X_train, X_test = X[train_rows], X[test_rows]
    y_train, y_test = y[train_rows], y[test_rows]
    # float64, as in the notebook: 8 bytes per channel value.
    return X_train / 255, y_train, X_test / 255, y_test, skipped
