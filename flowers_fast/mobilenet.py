"""MobileNetV2 itself: the Keras architecture, its seeded random initialisation, batch-norm
calibration, and the mapping of TF Hub (TF-Slim) weights onto it.

Both the offline exporter (``hubexport``) and the mixed-precision rebuild (``model``) use it.

A fresh MobileNetV2 in inference mode gives collapsed features (batch-norm moving statistics
are 0/1 while real activations are not), so the statistics are set from forward passes over
synthetic images. Even then, Keras' default (Glorot) random weights wash class information out
over 50 layers (on the synthetic set at 96 px, a head reached about 40%); random orthogonal
kernels with each block's expand/project pair starting near the identity preserve it (about
85-90%). So the weights stay random and seeded, only better drawn.
"""

from __future__ import annotations

import re

import numpy as np

from .tfkeras import keras, tf

FEATURE_DIM = 1280
NUM_CLASSES = 1001  # the Hub classifiers' ImageNet logits, index 0 = background


def build_features(image_size: int = 224, dtype_policy: str | None = None) -> "keras.Model":
    """The backbone (no top, average-pooled, ``FEATURE_DIM`` outputs), expecting inputs in [-1, 1]."""
    return _build(dict(include_top=False, pooling="avg"), image_size, dtype_policy)


def build_classifier(image_size: int = 224) -> "keras.Model":
    """MobileNetV2 with a ``NUM_CLASSES``-way top, logits out, inputs in [-1, 1]."""
    return _build(dict(classes=NUM_CLASSES, classifier_activation=None), image_size, None)


def _build(kwargs: dict, image_size: int, dtype_policy: str | None) -> "keras.Model":
    if dtype_policy:
        keras.mixed_precision.set_global_policy(dtype_policy)
    try:
        return keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3), weights=None, **kwargs)
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


def calibration_images(n: int, image_size: int, seed: int) -> np.ndarray:
    """Synthetic flowers, resized and scaled to [-1, 1], for batch-norm calibration and checks."""
    import cv2

    from .synthetic import CLASSES, render

    out = np.empty((n, image_size, image_size, 3), np.float32)
    for i in range(n):
        rgb = render(i % len(CLASSES), np.random.default_rng([seed, 10_000_000 + i]))
        out[i] = cv2.resize(rgb, (image_size, image_size)).astype(np.float32) / 127.5 - 1.0
    return out


# --- TF Hub weights onto the Keras architecture -----------------------------------------------

def _slim_to_keras(name: str) -> str:
    """TF-Slim MobilenetV2 variable names (the real Hub model) -> Keras MobileNetV2 names. With
    batch norm folded into the convolutions, a convolution's ``biases`` is its batch norm's beta
    (the rest of that batch norm is set to the identity: ``folded_batch_norm``)."""
    name = name.split(":")[0]
    name = re.sub(r"^.*?MobilenetV2/", "", name)
    kind = {"weights": "kernel", "depthwise_weights": "depthwise_kernel", "gamma": "gamma", "beta": "beta",
            "moving_mean": "moving_mean", "moving_variance": "moving_variance", "biases": "beta"}
    parts = name.split("/")
    var = kind.get(parts[-1], parts[-1])
    if var == "kernel" and "depthwise" in parts[:-1]:  # folded: depthwise/weights, not depthwise_weights
        var = "depthwise_kernel"
    bn = "BatchNorm" in parts or parts[-1] == "biases"
    block = parts[0]
    if block == "Conv":
        return f"{'bn_Conv1' if bn else 'Conv1'}/{var}"
    if block == "Conv_1":
        return f"{'Conv_1_bn' if bn else 'Conv_1'}/{var}"
    m = re.match(r"expanded_conv(?:_(\d+))?$", block)
    if m and len(parts) >= 2:
        prefix = "expanded_conv" if m.group(1) is None else f"block_{m.group(1)}"
        stage = parts[1]  # expand | depthwise | project
        return f"{prefix}_{stage}{'_BN' if bn else ''}/{var}"
    return name


def map_hub_weights(hub_weights, model: "keras.Model") -> tuple[dict, int]:
    """({model variable name: Hub variable or array}, number of model variables) by name (Keras
    or TF-Slim), falling back to creation order when the names don't line up but every shape does.
    Batch norm folded into the convolutions (every convolution with biases, no batch-norm
    variables: Google's Hub MobileNetV2) maps too, see ``folded_batch_norm``. Fewer matches than
    variables means the Hub model is not this architecture."""
    source = list(hub_weights)
    targets = model.weights
    by_name = {w.name.split(":")[0]: w for w in targets}
    assigned = {}
    for w in source:
        short = re.sub(r"^.*?(?=(Conv1|bn_Conv1|expanded_conv|block_\d+|Conv_1)\b)", "", w.name.split(":")[0])
        key = short if short in by_name else _slim_to_keras(w.name)
        if key in by_name and tuple(by_name[key].shape) == tuple(w.shape):
            assigned[key] = w
    if len(assigned) != len(targets) and len(source) == len(targets) and all(
            tuple(a.shape) == tuple(b.shape) for a, b in zip(source, targets)):
        assigned = {t.name.split(":")[0]: s for t, s in zip(targets, source)}
    if len(assigned) != len(targets):
        assigned.update(folded_batch_norm(model, assigned))
    return assigned, len(targets)


def folded_batch_norm(model: "keras.Model", assigned: dict) -> dict:
    """For weights whose batch norm is folded into the convolutions (kernel' = kernel * scale,
    bias = beta - mean * scale): every batch norm whose beta took a convolution's bias becomes
    conv + bias exactly, gamma 1, moving mean 0, moving variance 1 - epsilon (so the divisor is
    1). The layers stay where Keras has them (the tutorial's layer indices hold) and, in inference
    mode, compute what the Hub model computes. {} unless all batch norms are so and none has its
    own statistics."""
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    names = {w.name.split(":")[0]: w for bn in bns for w in bn.weights}
    if not bns or any(f"{bn.name}/beta" not in assigned for bn in bns) or any(
            n in assigned for n in names if not n.endswith("/beta")):
        return {}
    out = {}
    for bn in bns:
        ones = np.ones(bn.gamma.shape, np.float32)
        out.update({f"{bn.name}/gamma": ones, f"{bn.name}/moving_mean": 0 * ones,
                    f"{bn.name}/moving_variance": (1.0 - bn.epsilon) * ones})
    return out if len(out) + len(assigned) == len(model.weights) else {}


def assign_weights(model: "keras.Model", assigned: dict) -> None:
    by_name = {w.name.split(":")[0]: w for w in model.weights}
    for name, w in assigned.items():
        by_name[name].assign(w)
