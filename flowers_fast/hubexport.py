"""Export randomly initialised MobileNetV2s as TF2 SavedModels with the interfaces of TF Hub's
``mobilenet_v2/feature_vector/4`` and ``mobilenet_v2/classification/4``, so the real Hub
loading code runs offline.

Interface: float32 [None, S, S, 3] in [0, 1] -> float32 [None, 1280] features, or [None, 1001]
logits (index 0 "background", as in the Hub classifier and imagenet_labels.txt); ``__call__``
takes a ``training`` argument; ``variables``, ``trainable_variables`` and
``regularization_losses``. Weights are drawn and calibrated by ``mobilenet``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import mobilenet
from .config import WEIGHTS_MARKER  # beside random weights: config.weights_label says "random"
from .errors import OutputError
from .outputs import temp_dir
from .tfkeras import keras, tf

# 3 and 2: only the Hub interface's two functions and the variables are saved, not the Keras model's
# per-layer functions (a third of the file; loading took 3.1 s instead of 0.9 s in every worker).
EXPORT_VERSION = 3  # feature vector
CLASSIFIER_VERSION = 2


def _hub_module(backbone: "keras.Model", image_size: int):
    """A trackable object with the Hub interface around ``backbone``."""
    module = tf.train.Checkpoint()  # a plain trackable: attributes become SavedModel attributes
    # Not the Keras model itself as an attribute: its own per-layer functions would be saved too,
    # and every load would restore them (3x the file, 3x the load time) for nothing Hub uses.

    @tf.function
    def call(inputs, training=False):
        # Hub convention: inputs in [0, 1]; Keras MobileNetV2 expects [-1, 1].
        return backbone(inputs * 2.0 - 1.0, training=training)

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
    # Trace both modes, like the real Hub models, so ``training`` is a real argument.
    call.get_concrete_function(spec, training=False)
    call.get_concrete_function(spec, training=True)
    module.__call__ = call
    # Hub models expose these three attributes; hub.KerasLayer reads them.
    module.variables = list(backbone.variables)
    module.trainable_variables = list(backbone.trainable_variables)
    module.regularization_losses = []
    return module


def export_random(path: str | Path, build, note: str, seed: int, image_size: int, calibration: int) -> Path:
    """Draw ``build()``'s weights (seeded, orthogonal), calibrate its batch norm, and save it in
    Hub format to ``path`` atomically; nothing to do if it is already there."""
    path = Path(path)
    if (path / "saved_model.pb").exists():
        return path
    keras.utils.set_random_seed(seed)
    model = build()
    mobilenet.orthogonal_init(model, seed)
    mobilenet.calibrate_batch_norm(model, mobilenet.calibration_images(calibration, image_size, seed))
    module = _hub_module(model, image_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(path.parent, path.name + ".")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the model here ({exc.strerror or exc}); pass a folder you can "
                          "write to") from None
    try:
        tf.saved_model.save(module, str(tmp))
        (tmp / WEIGHTS_MARKER).write_text(note + "\n")
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first; theirs is identical
            if not (path / "saved_model.pb").exists():
                raise
    except (OSError, tf.errors.OpError) as exc:  # a full disk: nothing half-written is left behind
        why = getattr(exc, "strerror", None) or getattr(exc, "message", None) or str(exc)
        raise OutputError(f"{path}: cannot write the model ({why.splitlines()[0][:120]}); free disk space or pass "
                          "another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_random_mobilenet(path: str | Path, seed: int = 0, image_size: int = 224, calibration: int = 64) -> Path:
    """The feature-vector model at ``path`` (exported on first use); returns the path."""
    return export_random(path, lambda: mobilenet.build_features(image_size),
                         f"random MobileNetV2, seed {seed}, v{EXPORT_VERSION}", seed, image_size, calibration)


def export_random_classifier(path: str | Path, seed: int = 0, image_size: int = 224, calibration: int = 64) -> Path:
    """The classification model at ``path`` (exported on first use); returns the path."""
    return export_random(path, lambda: mobilenet.build_classifier(image_size),
                         f"random MobileNetV2 classifier ({mobilenet.NUM_CLASSES} logits), seed {seed}, "
                         f"v{CLASSIFIER_VERSION}", seed, image_size, calibration)


def default_path(cache: Path, seed: int = 0, image_size: int = 224) -> Path:
    return Path(cache) / "models" / f"mobilenet_v2_random-seed{seed}-{image_size}-v{EXPORT_VERSION}"


def classifier_path(cache: Path, seed: int = 0, image_size: int = 224) -> Path:
    return Path(cache) / "models" / f"mobilenet_v2_classifier_random-seed{seed}-{image_size}-v{CLASSIFIER_VERSION}"
