"""The model: a Hub feature extractor (frozen by default) plus a new Dense head.

fp32 runs the Hub SavedModel through ``hub.KerasLayer``. Mixed precision cannot: the Keras
policy only reaches the head, and feeding bfloat16 into the SavedModel's float32 signature
crashes. So ``precision=mixed`` rebuilds MobileNetV2 natively under the mixed policy, copies
the Hub weights into it, and checks its output against the Hub model before use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import hubexport
from .config import HUB_CLASSIFIER, HUB_FEATURE_VECTOR, RANDOM_HANDLE, RunConfig
from .errors import ModelError, OfflineError
from .tfkeras import hub, keras, tf

ALIASES = {"hub": HUB_FEATURE_VECTOR, "hub-classifier": HUB_CLASSIFIER}


@dataclass
class Backbone:
    layer: "keras.layers.Layer"  # float32 images in [0, 1] -> features
    handle: str  # what was loaded (a path or URL)
    weights: str  # pretrained | random
    compute_dtype: str  # the dtype the convolutions actually run in
    feature_dim: int


def resolve_handle(handle: str, cache: Path, seed: int = 0, image_size: int = 224,
                   export_random=None, what: str = "a Hub URL") -> tuple[str, str]:
    """(loadable handle, weights kind). ``random`` calls ``export_random()`` (default: the offline
    feature-vector MobileNetV2), which exports on first use and returns its path."""
    handle = ALIASES.get(handle, handle)
    if handle == RANDOM_HANDLE:
        if export_random is None:
            return str(hubexport.export_random_mobilenet(hubexport.default_path(cache, seed, image_size), seed,
                                                         image_size)), "random"
        return str(export_random()), "random"
    if re.match(r"^https?://", handle):
        # Hub caches downloads here; an explicit TFHUB_CACHE_DIR from the user wins.
        os.environ.setdefault("TFHUB_CACHE_DIR", str(Path(cache) / "hub"))
        return handle, "pretrained"
    path = Path(handle).expanduser()
    if not path.exists():
        raise ModelError(f"--model-handle {handle}: no such file or folder; pass {what}, a local SavedModel "
                         "folder, or 'random' for the built-in offline MobileNetV2")
    if not (path / "saved_model.pb").exists():
        raise ModelError(f"--model-handle {handle}: not a SavedModel (no saved_model.pb inside); pass the folder "
                         "of an extracted TF Hub model")
    # The exporter leaves this file beside random weights.
    weights = "random" if (path / "flowers_fast_weights.txt").exists() else "pretrained"
    return str(path), weights


def _hub_layer(handle: str, trainable: bool, name: str = "backbone") -> "hub.KerasLayer":
    try:
        return hub.KerasLayer(handle, trainable=trainable, name=name)
    except Exception as exc:
        if handle.startswith("http"):
            raise OfflineError(f"--model-handle {handle}: could not download ({type(exc).__name__}); offline, pass "
                               "--model-handle PATH (an extracted Hub SavedModel) or --model-handle random") from None
        raise ModelError(f"--model-handle {handle}: could not load as a Hub model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160]})") from None


def eager_call(layer, x):
    """``layer(x)`` run eagerly also under a strategy's scope: a Hub SavedModel loaded under
    MirroredStrategy.scope() fails when called in cross-replica context, so run it on the replicas."""
    if tf.distribute.in_cross_replica_context():
        strategy = tf.distribute.get_strategy()
        return strategy.experimental_local_results(strategy.run(layer, args=(x,)))[0]
    return layer(x)


def _check_features(layer, handle: str, image_size: int) -> int:
    try:
        out = eager_call(layer, tf.zeros([1, image_size, image_size, 3], tf.float32))
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
        raise ModelError(f"--model-handle {handle}: does not take float32 images of {image_size}x{image_size}x3 "
                         f"({type(exc).__name__}); check the handle and --image-size") from None
    if len(out.shape) != 2 or out.shape[-1] == 1001:
        raise ModelError(f"--model-handle {handle}: outputs shape {tuple(out.shape)}, expected [batch, features]; "
                         "pass a feature_vector model (not a classification one, whose 1001 outputs are ImageNet "
                         "logits)")
    return int(out.shape[-1])


def build_backbone(cfg: RunConfig, cache: Path) -> Backbone:
    handle, weights = resolve_handle(cfg.model_handle, cache, cfg.seed, cfg.image_size)
    hub_layer = _hub_layer(handle, trainable=cfg.fine_tune)
    dim = _check_features(hub_layer, handle, cfg.image_size)
    if cfg.precision == "fp32":
        return Backbone(hub_layer, handle, weights, "float32", dim)
    native = native_mobilenet(hub_layer, cfg.image_size, f"mixed_{cfg.mixed_dtype}", handle)
    native.trainable = cfg.fine_tune
    return Backbone(native, handle, weights, conv_compute_dtype(native, cfg.image_size), dim)


# --- mixed precision: native MobileNetV2 carrying the Hub weights ---------------------------

def _slim_to_keras(name: str) -> str:
    """TF-Slim MobilenetV2 variable names (the real Hub model) -> Keras MobileNetV2 names."""
    name = name.split(":")[0]
    name = re.sub(r"^.*?MobilenetV2/", "", name)
    kind = {"weights": "kernel", "depthwise_weights": "depthwise_kernel", "gamma": "gamma", "beta": "beta",
            "moving_mean": "moving_mean", "moving_variance": "moving_variance"}
    parts = name.split("/")
    var = kind.get(parts[-1], parts[-1])
    bn = "BatchNorm" in parts
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


def native_mobilenet(hub_layer, image_size: int, policy: str, handle: str) -> "keras.Model":
    """Keras MobileNetV2 under ``policy`` with the Hub layer's weights, taking [0, 1] inputs.

    The weights are mapped into a float32 rebuild first and checked against the Hub model
    tightly (a wrong mapping cannot hide behind reduced-precision error), then copied into
    the rebuild under ``policy``.
    """
    reference = hubexport.build_keras_mobilenet(image_size)
    _copy_hub_weights(hub_layer, reference, handle)
    _verify_against_hub(_from_unit_range(reference, image_size), hub_layer, image_size, handle, tolerance=1e-3)
    base = hubexport.build_keras_mobilenet(image_size, dtype_policy=policy)
    base.set_weights(reference.get_weights())
    return _from_unit_range(base, image_size)


def _from_unit_range(base, image_size: int) -> "keras.Model":
    inputs = keras.Input((image_size, image_size, 3), dtype="float32")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_minus1_1")(inputs)  # Hub [0,1] -> Keras [-1,1]
    return keras.Model(inputs, base(x), name="backbone_native")


def _copy_hub_weights(hub_layer, base, handle: str) -> None:
    source = list(hub_layer.weights)
    targets = base.weights
    by_name = {w.name.split(":")[0]: w for w in targets}
    assigned = {}
    for w in source:
        short = re.sub(r"^.*?(?=(Conv1|bn_Conv1|expanded_conv|block_\d+|Conv_1)\b)", "", w.name.split(":")[0])
        key = short if short in by_name else _slim_to_keras(w.name)
        if key in by_name and tuple(by_name[key].shape) == tuple(w.shape):
            assigned[key] = w
    if len(assigned) != len(targets):
        # Fall back to creation order when names don't line up but the shapes do.
        if len(source) == len(targets) and all(tuple(a.shape) == tuple(b.shape) for a, b in zip(source, targets)):
            assigned = {t.name.split(":")[0]: s for t, s in zip(targets, source)}
        else:
            raise ModelError(f"--model-handle {handle}: --precision mixed rebuilds MobileNetV2 natively, but only "
                             f"{len(assigned)}/{len(targets)} weights matched; use --precision fp32 for this model")
    for name, w in assigned.items():
        by_name[name].assign(w)


def relative_error(model, hub_layer, image_size: int) -> float:
    """Relative L2 distance between ``model``'s features and the Hub model's on synthetic flowers."""
    images = hubexport.calibration_images(8, image_size, seed=123) * 0.5 + 0.5
    ref = eager_call(hub_layer, tf.constant(images)).numpy().astype(np.float64)
    got = tf.cast(model(tf.constant(images)), tf.float32).numpy().astype(np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


def _verify_against_hub(native, hub_layer, image_size: int, handle: str, tolerance: float) -> None:
    rel = relative_error(native, hub_layer, image_size)
    if not np.isfinite(rel) or rel > tolerance:
        raise ModelError(f"--model-handle {handle}: the native MobileNetV2 rebuild differs from the Hub model "
                         f"(relative error {rel:.3g}); use --precision fp32 for this model")


def conv_compute_dtype(model, image_size: int = 224) -> str:
    """The dtype the backbone's convolutions run in, read from the traced graph (not the policy)."""
    fn = tf.function(lambda x: model(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
    dtypes = set()

    def visit(g):
        for op in g.get_operations():
            if op.type in ("Conv2D", "DepthwiseConv2dNative"):
                dtypes.add(op.get_attr("T").name)
        for f in getattr(g, "_functions", {}).values():
            visit(f.graph if hasattr(f, "graph") else f)

    visit(graph)
    return ",".join(sorted(dtypes)) or "unknown"


# --- the whole classifier ------------------------------------------------------------------

def build_head(num_classes: int, seed: int) -> "keras.layers.Dense":
    # float32 logits keep softmax/cross-entropy numerically safe under mixed precision.
    return keras.layers.Dense(num_classes, dtype="float32", name="head",
                              kernel_initializer=keras.initializers.GlorotUniform(seed=seed))


def build_classifier(backbone: Backbone, num_classes: int, cfg: RunConfig, input_kind: str = "uint8"):
    """Images -> logits. ``input_kind``: ``uint8`` (0..255, scaled in the model), ``float255``
    (the tutorial's Rescaling layer), or ``unit`` (already in [0, 1], the notebook's /255)."""
    size = cfg.image_size
    if input_kind == "uint8":
        inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
        x = keras.layers.Rescaling(1.0 / 255, name="scale")(tf.cast(inputs, tf.float32))
    elif input_kind == "float255":
        inputs = keras.Input((size, size, 3), dtype="float32", name="image")
        x = keras.layers.Rescaling(1.0 / 255, name="scale")(inputs)
    elif input_kind == "unit":
        inputs = keras.Input((size, size, 3), dtype="float32", name="image")
        x = inputs
    else:
        raise ValueError(input_kind)
    features = backbone.layer(x)
    logits = build_head(num_classes, cfg.seed)(features)
    return keras.Model(inputs, logits, name="flowers_classifier")


def compile_classifier(model, cfg: RunConfig) -> None:
    optimizer = keras.optimizers.Adam(cfg.learning_rate)
    if cfg.precision == "mixed" and cfg.mixed_dtype == "float16":
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=cfg.xla_step)
