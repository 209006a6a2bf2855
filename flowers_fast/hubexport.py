"""Export a randomly initialised MobileNetV2 as a TF2 SavedModel with the interface of
TF Hub's ``mobilenet_v2/feature_vector/4``, so the real Hub loading code runs offline.

Interface: float32 [None, 224, 224, 3] in [0, 1] -> float32 [None, 1280]; ``__call__`` takes a
``training`` argument; ``variables``, ``trainable_variables`` and ``regularization_losses``.

A fresh MobileNetV2 in inference mode gives collapsed features (batch-norm moving statistics
are 0/1 while real activations are not), so before export the batch-norm statistics are set
from forward passes over synthetic images. Even then, Keras' default (Glorot) random weights
wash class information out over 50 layers (on the synthetic set at 96 px, a head reached about
40%); random orthogonal kernels with each block's expand/project pair starting near the
identity preserve it (about 85-90%). So the weights stay random and seeded, only better drawn.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .tfkeras import keras, tf

EXPORT_VERSION = 2
FEATURE_DIM = 1280


def build_keras_mobilenet(image_size: int = 224, dtype_policy: str | None = None) -> "keras.Model":
    """The Keras MobileNetV2 backbone (no top, average-pooled), expecting inputs in [-1, 1]."""
    if dtype_policy:
        keras.mixed_precision.set_global_policy(dtype_policy)
    try:
        return keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3), include_top=False,
                                              weights=None, pooling="avg")
    finally:
        if dtype_policy:
            keras.mixed_precision.set_global_policy("float32")


def orthogonal_init(model: "keras.Model", seed: int) -> None:
    """Re-draw the convolution kernels (depthwise kept) as random orthogonal matrices, each
    inverted-residual block's expand and project as one orthogonal Q (expand = Q^T, project = Q),
    so a block's linear path starts near the identity and class information survives 17 blocks."""
    rng = np.random.default_rng(seed)

    def orthonormal_columns(rows: int, cols: int) -> np.ndarray:
        q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
        return q * np.sign(np.diag(r))

    layers = {layer.name: layer for layer in model.layers}
    paired = set()
    for name, project in layers.items():
        if not name.endswith("_project") or not isinstance(project, keras.layers.Conv2D):
            continue
        expand = layers.get(name[: -len("project")] + "expand")
        hidden, cout = project.kernel.shape[2], project.kernel.shape[3]
        if expand is None:  # the first block has no expansion
            continue
        cin = expand.kernel.shape[2]
        q = orthonormal_columns(hidden, max(cin, cout))
        expand.kernel.assign(q[:, :cin].T.reshape(1, 1, cin, hidden).astype(np.float32))
        project.kernel.assign(q[:, :cout].reshape(1, 1, hidden, cout).astype(np.float32))
        paired.update({name, expand.name})
    for layer in model.layers:
        if (isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D)
                and layer.name not in paired):
            shape = tuple(layer.kernel.shape)
            rows, cols = int(np.prod(shape[:3])), shape[3]
            flat = orthonormal_columns(rows, cols) if rows >= cols else orthonormal_columns(cols, rows).T
            layer.kernel.assign(flat.reshape(shape).astype(np.float32))


def calibrate_batch_norm(model: "keras.Model", images: np.ndarray, batch_size: int = 64) -> None:
    """Set every batch-norm layer's moving mean/variance to the statistics of real activations.

    One training-mode pass with momentum 0 makes moving = batch statistics, layer by layer,
    each layer seeing inputs already normalised by the layers before it.
    """
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        model(tf.convert_to_tensor(images[:batch_size]), training=True)
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum


def _hub_module(backbone: "keras.Model", image_size: int):
    """A trackable object with the Hub feature-vector interface around ``backbone``."""
    module = tf.train.Checkpoint()  # a plain trackable: attributes become SavedModel attributes
    module.backbone = backbone

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


def calibration_images(n: int, image_size: int, seed: int) -> np.ndarray:
    """Synthetic flowers, resized and scaled to [-1, 1], for batch-norm calibration."""
    import cv2

    from .synthetic import CLASSES, render

    out = np.empty((n, image_size, image_size, 3), np.float32)
    for i in range(n):
        rgb = render(i % len(CLASSES), np.random.default_rng([seed, 10_000_000 + i]))
        out[i] = cv2.resize(rgb, (image_size, image_size)).astype(np.float32) / 127.5 - 1.0
    return out


def export_random_mobilenet(path: str | Path, seed: int = 0, image_size: int = 224,
                            calibration: int = 64) -> Path:
    """Write the Hub-format feature-vector SavedModel to ``path`` atomically; returns the path."""
    return export_random(path, lambda: build_keras_mobilenet(image_size), f"random MobileNetV2, seed {seed}, "
                         f"v{EXPORT_VERSION}", seed, image_size, calibration)


def export_random(path: str | Path, build, note: str, seed: int, image_size: int, calibration: int) -> Path:
    """Draw ``build()``'s weights (seeded, orthogonal), calibrate its batch norm, and save it in
    Hub format to ``path`` atomically; nothing to do if it is already there."""
    path = Path(path)
    if (path / "saved_model.pb").exists():
        return path
    keras.utils.set_random_seed(seed)
    model = build()
    orthogonal_init(model, seed)
    calibrate_batch_norm(model, calibration_images(calibration, image_size, seed))
    module = _hub_module(model, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        tf.saved_model.save(module, str(tmp))
        # Marks the weights as random: reports say so (model.resolve_handle reads it).
        (tmp / "flowers_fast_weights.txt").write_text(note + "\n")
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first; theirs is identical
            if not (path / "saved_model.pb").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_path(cache: Path, seed: int = 0, image_size: int = 224) -> Path:
    return Path(cache) / "models" / f"mobilenet_v2_random-seed{seed}-{image_size}-v{EXPORT_VERSION}"
