"""Export a randomly initialised MobileNetV2 *with* its ImageNet top, in the interface of TF Hub's
``mobilenet_v2/classification/4``, so ``predict`` runs offline and in tests.

Interface: float32 [None, 224, 224, 3] in [0, 1] -> float32 logits [None, 1001] (index 0 is
"background", as in the Hub model and imagenet_labels.txt); ``__call__`` takes ``training``.
Weights are drawn and batch-norm-calibrated as in ``hubexport`` (orthogonal kernels,
statistics from synthetic flowers). The predictions are meaningless but deterministic.
"""

from __future__ import annotations

from pathlib import Path

from .hubexport import export_random
from .tfkeras import keras

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
    return export_random(path, lambda: build_keras_classifier(image_size),
                         f"random MobileNetV2 classifier ({NUM_CLASSES} logits), seed {seed}, v{EXPORT_VERSION}",
                         seed, image_size, calibration)


def default_path(cache: Path, seed: int = 0, image_size: int = 224) -> Path:
    return Path(cache) / "models" / f"mobilenet_v2_classifier_random-seed{seed}-{image_size}-v{EXPORT_VERSION}"
