"""Export a randomly initialised MobileNetV2 *with* its ImageNet top, in the interface of TF Hub's
``mobilenet_v2/classification/4``, so ``predict`` runs offline and in tests.

Interface: float32 [None, 224, 224, 3] in [0, 1] -> float32 logits [None, 1001] (index 0 is
"background", as in the Hub model and imagenet_labels.txt); ``__call__`` takes ``training``.
Weights are drawn and batch-norm-calibrated as in ``hubexport`` (orthogonal kernels,
statistics from synthetic flowers). The predictions are meaningless but deterministic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .hubexport import _hub_module, calibrate_batch_norm, calibration_images, orthogonal_init
from .tfkeras import keras, tf

EXPORT_VERSION = 1
NUM_CLASSES = 1001


def build_keras_classifier(image_size: int = 224) -> "keras.Model":
    """Keras MobileNetV2 with a 1001-way top, logits out, inputs in [-1, 1]."""
    return keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3), weights=None,
                                          classes=NUM_CLASSES, classifier_activation=None)


def export_random_classifier(path: str | Path, seed: int = 0, image_size: int = 224,
                             calibration: int = 64) -> Path:
    """Write the Hub-classification-format SavedModel to ``path`` atomically (nothing to do if
    it is already there); returns the path."""
    path = Path(path)
    if (path / "saved_model.pb").exists():
        return path
    keras.utils.set_random_seed(seed)
    model = build_keras_classifier(image_size)
    orthogonal_init(model, seed)
    calibrate_batch_norm(model, calibration_images(calibration, image_size, seed))
    module = _hub_module(model, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        tf.saved_model.save(module, str(tmp))
        (tmp / "flowers_fast_weights.txt").write_text(
            f"random MobileNetV2 classifier ({NUM_CLASSES} logits), seed {seed}, v{EXPORT_VERSION}\n")
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "saved_model.pb").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_path(cache: Path, seed: int = 0, image_size: int = 224) -> Path:
    return Path(cache) / "models" / f"mobilenet_v2_classifier_random-seed{seed}-{image_size}-v{EXPORT_VERSION}"
