"""The model: a Hub feature extractor (frozen by default) plus a new Dense head, and the frozen
feature pass that featcache runs once.

fp32 runs the Hub SavedModel through ``hub.KerasLayer``. Mixed precision cannot: the Keras
policy only reaches the head, and feeding bfloat16 into the SavedModel's float32 signature
crashes. So ``precision=mixed`` takes one of these routes, recorded in the row's ``mixed_route``:

- ``native``: MobileNetV2 rebuilt natively under the mixed policy (``mobilenet``), the Hub
  weights copied in (also with batch norm folded into the convolutions, as Google's Hub models
  have it) and the output checked against the Hub model;
- where the weights do not map (another architecture, an opaque SavedModel), a graph-level
  rewrite of the float32 Hub function: ``grappler-fp16`` (grappler's ``auto_mixed_precision``)
  on a GPU, ``grappler-onednn-bf16`` (``auto_mixed_precision_onednn_bfloat16``, which needs
  TensorFlow's oneDNN kernels) on a CPU;
- ``openvino-bf16`` with ``--engine openvino``: OpenVINO converts the float32 function and runs it
  in bfloat16 (see engine.py).

Every route's features are compared with the float32 Hub model's (``feature_cosine_vs_fp32``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import hubexport, mobilenet, runtime
from .config import (HUB_CLASSIFIER, HUB_FEATURE_VECTOR, RANDOM_HANDLE, RANDOM_WEIGHTS, RunConfig,
                     weights_label)
from .errors import ModelError, OfflineError, UnsupportedError
from .tfkeras import hub, keras, tf

# The short names a user may pass as --model-handle, per kind of model wanted. "random" is the
# built-in offline model of that kind.
FEATURE_VECTOR, CLASSIFICATION = "feature_vector", "classification"
ALIASES = {
    FEATURE_VECTOR: {"hub": HUB_FEATURE_VECTOR, "hub-feature-vector": HUB_FEATURE_VECTOR},
    CLASSIFICATION: {"hub": HUB_CLASSIFIER, "hub-classifier": HUB_CLASSIFIER},
}


NATIVE, GRAPPLER_FP16, GRAPPLER_BF16, OPENVINO_BF16 = "native", "grappler-fp16", "grappler-onednn-bf16", "openvino-bf16"
OPENVINO_INT8 = "openvino-int8"


@dataclass
class Backbone:
    layer: "keras.layers.Layer"  # float32 images in [0, 1] -> features
    handle: str  # what was loaded (a path or URL)
    weights: str  # what is known of them: config.weights_label
    compute_dtype: str  # the dtype the convolutions actually run in
    feature_dim: int
    mixed_route: str = ""  # how --precision mixed runs (see the module's docstring); "" for fp32
    hub_layer: object = None  # the float32 Hub layer: the reference for other precisions and engines
    cosine_vs_fp32: float = float("nan")  # least feature cosine similarity to hub_layer on synthetic flowers
    cut: int | None = None  # --fine-tune-from's layer index in the native rebuild (None: no fine-tune phase)


class NotMappable(Exception):
    """The native rebuild cannot carry this Hub model's weights."""


# --- finding and loading a Hub model -----------------------------------------------------------

def resolve_handle(handle: str, cache: Path, kind: str = FEATURE_VECTOR, seed: int = 0,
                   image_size: int = 224) -> tuple[str, str]:
    """(loadable handle, what is known of its weights: config.weights_label). ``random`` exports the offline model
    of ``kind`` on first use; URLs are left to TF Hub, with its cache under ``cache``."""
    handle = ALIASES[kind].get(handle, handle)
    if handle == RANDOM_HANDLE:
        if kind == FEATURE_VECTOR:
            path = hubexport.export_random_mobilenet(hubexport.default_path(cache, seed, image_size), seed, image_size)
        else:
            path = hubexport.export_random_classifier(hubexport.classifier_path(cache, seed, image_size), seed,
                                                      image_size)
        return str(path), RANDOM_WEIGHTS
    if re.match(r"^https?://", handle):
        # Hub caches downloads here; an explicit TFHUB_CACHE_DIR from the user wins.
        os.environ.setdefault("TFHUB_CACHE_DIR", str(Path(cache) / "hub"))
        return handle, weights_label(handle)
    path = Path(handle).expanduser()
    what = "a Hub classification URL" if kind == CLASSIFICATION else "a Hub URL"
    if not path.exists():
        raise ModelError(f"--model-handle {handle}: no such file or folder; pass {what}, a local SavedModel "
                         "folder, or 'random' for the built-in offline MobileNetV2")
    if not (path / "saved_model.pb").exists():
        raise ModelError(f"--model-handle {handle}: not a SavedModel (no saved_model.pb inside); pass the folder "
                         "of an extracted TF Hub model")
    return str(path), weights_label(str(path))


def load_hub_layer(handle: str, trainable: bool = False, name: str = "backbone",
                   weights: str = "") -> "hub.KerasLayer":
    """``hub.KerasLayer(handle)``; a download or load failure is one line (offline: exit 6).
    ``weights`` as from resolve_handle: ``random`` means our own export, in the cache."""
    try:
        return hub.KerasLayer(handle, trainable=trainable, name=name)
    except Exception as exc:
        if re.match(r"^https?://", handle):
            raise OfflineError(f"--model-handle {handle}: could not download ({type(exc).__name__}); offline, pass "
                               "--model-handle PATH (an extracted Hub SavedModel) or --model-handle random") from None
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        if weights == RANDOM_WEIGHTS and Path(handle).parent.name == "models":
            # Our export in the cache, damaged (a full disk, a killed copy): the user gave "random".
            raise ModelError(f"--model-handle random: the offline model cached at {handle} cannot be loaded "
                             f"({type(exc).__name__}: {first}); delete that folder and rerun to export it "
                             "again") from None
        raise ModelError(f"--model-handle {handle}: could not load as a Hub model ({type(exc).__name__}: "
                         f"{first})") from None


def eager_call(layer, x):
    """``layer(x)`` run eagerly also under a strategy's scope: a Hub SavedModel loaded under
    MirroredStrategy.scope() fails when called in cross-replica context, so run it on the replicas."""
    if tf.distribute.in_cross_replica_context():
        strategy = tf.distribute.get_strategy()
        return strategy.experimental_local_results(strategy.run(layer, args=(x,)))[0]
    return layer(x)


def output_shape(layer, handle: str, image_size: int, hint: str = "check the handle and --image-size") -> tuple:
    """The layer's output shape for one float32 image, or a one-line ModelError."""
    try:
        out = eager_call(layer, tf.zeros([1, image_size, image_size, 3], tf.float32))
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
        raise ModelError(f"--model-handle {handle}: does not take float32 images of {image_size}x{image_size}x3 "
                         f"({type(exc).__name__}); {hint}") from None
    return tuple(out.shape)


def _check_features(layer, handle: str, image_size: int) -> int:
    shape = output_shape(layer, handle, image_size)
    if len(shape) != 2 or shape[-1] == mobilenet.NUM_CLASSES:
        raise ModelError(f"--model-handle {handle}: outputs shape {shape}, expected [batch, features]; "
                         "pass a feature_vector model (not a classification one, whose 1001 outputs are ImageNet "
                         "logits)")
    return int(shape[-1])


def build_backbone(cfg: RunConfig, cache: Path) -> Backbone:
    handle, weights = resolve_handle(cfg.model_handle, cache, FEATURE_VECTOR, cfg.seed, cfg.image_size)
    hub_layer = load_hub_layer(handle, trainable=cfg.fine_tune, weights=weights)
    dim = _check_features(hub_layer, handle, cfg.image_size)
    if cfg.precision == "fp32" and not cfg.fine_tune_epochs:
        return Backbone(hub_layer, handle, weights, "float32", dim, "", hub_layer, 1.0)
    if cfg.fine_tune_epochs:
        return _cut_backbone(cfg, hub_layer, handle, weights, dim)
    if cfg.engine == "openvino":
        # OpenVINO converts the float32 Hub function and lowers the precision itself (int8: NNCF).
        route = OPENVINO_INT8 if cfg.precision == "int8" else OPENVINO_BF16
        return Backbone(hub_layer, handle, weights, "float32", dim, route, hub_layer)
    if cfg.pipeline == "featcache" and cfg.device == "cpu" and runtime.onednn_enabled():
        # featcache's pass is inference only: grappler's bf16 rewrite of the Hub graph ran it 2.2x
        # TensorFlow float32, the Keras mixed policy on the native rebuild 0.5x (real weights, 500
        # photos, a Sapphire Rapids class Xeon, 2026-12-01): the policy casts around every layer.
        return graph_mixed(cfg, hub_layer, handle, weights, dim, "featcache's frozen pass runs the Hub graph")
    try:
        native = native_mobilenet(hub_layer, cfg.image_size, f"mixed_{cfg.mixed_dtype}")
    except NotMappable as exc:
        return graph_mixed(cfg, hub_layer, handle, weights, dim, str(exc))
    native.trainable = cfg.fine_tune
    return Backbone(native, handle, weights, conv_compute_dtype(native, cfg.image_size), dim, NATIVE, hub_layer,
                    feature_cosine(native, hub_layer, cfg.image_size))


# --- fine-tuning from a layer: the native rebuild, frozen layer by layer ---------------------

def _cut_backbone(cfg: RunConfig, hub_layer, handle: str, weights: str, dim: int) -> Backbone:
    """The native rebuild (a Hub SavedModel cannot be frozen layer by layer), frozen for the head
    phase; ``unfreeze_from`` opens its top for the fine-tune phase. Under the mixed policy for
    --precision mixed on TensorFlow, else float32 (cutcache on OpenVINO: OpenVINO lowers the
    bottom's precision itself; the top trains in float32)."""
    policy = f"mixed_{cfg.mixed_dtype}" if cfg.precision == "mixed" and cfg.engine == "tf" else "float32"
    try:
        native = native_mobilenet(hub_layer, cfg.image_size, policy)
    except NotMappable as exc:
        raise ModelError(f"--fine-tune-from {cfg.fine_tune_from}: {exc} of --model-handle {handle}, so its layers "
                         "cannot be unfrozen one by one; use --fine-tune (the whole backbone, any Hub model), or a "
                         "MobileNetV2 like --model-handle random or Google's Hub MobileNetV2") from None
    native.trainable = False
    cut = cut_index(native, cfg.fine_tune_from)  # a bad name fails here, before any training
    route = "" if policy == "float32" else NATIVE
    return Backbone(native, handle, weights, conv_compute_dtype(native, cfg.image_size), dim, route, hub_layer,
                    feature_cosine(native, hub_layer, cfg.image_size), cut=cut)


def native_base(layer) -> "keras.Model":
    """The Keras MobileNetV2 inside ``native_mobilenet``'s model (its layer indices are Keras's)."""
    return layer.layers[-1]


def cut_index(layer, where: str) -> int:
    """``--fine-tune-from``'s layer index in the native MobileNetV2: an index, a layer's name, or a
    block's name (its first layer, e.g. block_15 -> block_15_expand)."""
    layers = native_base(layer).layers
    names = [lyr.name for lyr in layers]
    if where.isdigit():
        if int(where) < len(layers):
            return int(where)
        raise ModelError(f"--fine-tune-from {where}: MobileNetV2 has layers 0..{len(layers) - 1}; pass one of those "
                         "or a block name such as block_15")
    if where in names:
        return names.index(where)
    first = next((i for i, name in enumerate(names) if name.startswith(where + "_")), None)
    if first is None:
        raise ModelError(f"--fine-tune-from {where}: MobileNetV2 has no such layer or block; pass a layer index "
                         f"0..{len(layers) - 1} or a name such as block_1 .. block_16, block_15_expand, Conv_1")
    return first


def unfreeze_from(backbone: Backbone) -> list[str]:
    """Make the native backbone's layers from ``backbone.cut`` up trainable, those below frozen:
    the names of the layers with weights that now train. Batch norm stays in inference mode
    (build_classifier calls the backbone with training=False), so its statistics never move."""
    base = native_base(backbone.layer)
    backbone.layer.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= backbone.cut
    return [layer.name for layer in base.layers[backbone.cut:] if layer.trainable_weights]


@dataclass
class Cut:
    """The native backbone split for the cut cache: ``bottom`` (uint8 images -> the activations
    entering layer ``start``, float16) runs once; ``top`` (those activations -> features) shares
    the backbone's layers from ``start`` up, so what it trains is the backbone's."""

    start: int  # the lowest layer at or below the cut that only one tensor from below enters
    name: str  # that layer's name
    shape: tuple  # the activations' shape per image
    bottom: object
    top: "keras.Model"


def cut_parts(backbone: Backbone, image_size: int) -> Cut:
    """Where to cache for a cut at ``backbone.cut``: the nearest layer at or below it that a single
    tensor from below enters (a block's start, where its residual input is that tensor too), so
    layers between there and the cut are recomputed, frozen, each epoch (cut at layer 100, inside
    block 11 at 14x14x576: the cache holds block 11's 14x14x96 input)."""
    base = native_base(backbone.layer)
    layers = base.layers
    # Node 0: the base's own graph (building ``top`` calls its layers again, adding nodes).
    producer = {id(layer.get_output_at(0)): i for i, layer in enumerate(layers)}

    def inputs(layer):
        given = layer.get_input_at(0)
        return given if isinstance(given, list) else [given]

    for start in range(backbone.cut, 0, -1):
        crossing = {producer[id(t)] for layer in layers[start:] for t in inputs(layer) if producer[id(t)] < start}
        if len(crossing) == 1 and start > 1:
            break
    else:
        raise ModelError(f"--fine-tune-from {layers[backbone.cut].name}: at the stem there is nothing below the cut to "
                         "cache; use --pipeline tfdata, or cut at a block (block_1 .. block_16)")
    cached = layers[crossing.pop()].get_output_at(0)
    bottom_model = keras.Model(base.input, cached)
    scale = backbone.layer.get_layer("to_minus1_1")

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    def bottom(images):
        x = scale(tf.cast(images, tf.float32) / 255.0)
        return tf.cast(bottom_model(x, training=False), tf.float16)  # halves the cache; ample for activations

    top_in = keras.Input(tuple(cached.shape[1:]), dtype="float32", name="activations")
    out = {id(cached): top_in}
    for layer in layers[start:]:
        ins = [out[id(t)] for t in inputs(layer)]
        out[id(layer.get_output_at(0))] = layer(ins if isinstance(layer.get_input_at(0), list) else ins[0])
    top = keras.Model(top_in, out[id(base.outputs[0])], name="backbone_top")
    return Cut(start, layers[start].name, tuple(cached.shape[1:]), bottom, top)


def top_classifier(cut: Cut, cfg: RunConfig, head) -> "keras.Model":
    """Cached activations (float16) -> logits: the backbone's top, batch norm in inference mode,
    and ``head`` (the one the head phase trained)."""
    inputs = keras.Input(cut.shape, dtype="float16", name="activations")
    features = cut.top(tf.cast(inputs, tf.float32), training=False)
    return keras.Model(inputs, head(features), name="top_on_activations")


# --- mixed precision: a graph rewrite of the float32 Hub function -----------------------------

def graph_mixed(cfg: RunConfig, hub_layer, handle: str, weights: str, dim: int, why: str) -> Backbone:
    """The Hub layer as it is, with grappler's mixed-precision rewrite switched on for this process
    (the bench runs each configuration in its own). The rewrite happens when a function first
    runs, so whether it acted is measured: features of a fresh function after switching it on,
    against those of one run before."""
    if cfg.device == "gpu":
        option, route = "auto_mixed_precision", GRAPPLER_FP16
    elif runtime.onednn_enabled():
        option, route = "auto_mixed_precision_onednn_bfloat16", GRAPPLER_BF16
    else:
        raise UnsupportedError(
            f"--precision mixed --model-handle {handle}: {why}, and TensorFlow's bfloat16 graph rewrite needs its "
            "oneDNN kernels, which are off on this CPU; add --onednn on, or run featcache with --engine openvino on a "
            "CPU with native bfloat16, or use --precision fp32")
    images = tf.constant(mobilenet.calibration_images(8, cfg.image_size, seed=123) * 0.5 + 0.5)
    reference = _fresh_features(hub_layer, images)
    tf.config.optimizer.set_experimental_options({option: True})
    got = _fresh_features(hub_layer, images)
    rel = np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-12)
    # Unchanged output means the rewrite did not act (e.g. a GPU without fast float16): say float32.
    dtype = cfg.mixed_dtype if rel > 1e-5 else "float32"
    return Backbone(hub_layer, handle, weights, dtype, dim, route, hub_layer, float(cosine(got, reference).min()))


def _fresh_features(layer, images) -> np.ndarray:
    fn = tf.function(lambda x: layer(x, training=False))  # a new function: optimised on its first run
    return tf.cast(eager_call(fn, images), tf.float32).numpy().astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two batches (features, or activations flattened per row)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def feature_cosine(model, hub_layer, image_size: int) -> float:
    """Least cosine similarity between ``model``'s features and the float32 Hub model's on 8 synthetic flowers."""
    images = tf.constant(mobilenet.calibration_images(8, image_size, seed=123) * 0.5 + 0.5)
    got = tf.cast(model(images), tf.float32).numpy()
    return float(cosine(got, eager_call(hub_layer, images).numpy()).min())


# --- mixed precision: native MobileNetV2 carrying the Hub weights ---------------------------

def native_mobilenet(hub_layer, image_size: int, policy: str) -> "keras.Model":
    """Keras MobileNetV2 under ``policy`` with the Hub layer's weights, taking [0, 1] inputs.

    The weights are mapped into a float32 rebuild first and checked against the Hub model
    tightly (a wrong mapping cannot hide behind reduced-precision error), then copied into
    the rebuild under ``policy``.
    """
    reference = mobilenet.build_features(image_size)
    assigned, wanted = mobilenet.map_hub_weights(hub_layer.weights, reference)
    if len(assigned) != wanted:
        raise NotMappable(f"the native MobileNetV2 rebuild maps only {len(assigned)}/{wanted} of its weights")
    mobilenet.assign_weights(reference, assigned)
    rel = relative_error(_from_unit_range(reference, image_size), hub_layer, image_size)
    if not np.isfinite(rel) or rel > 1e-3:
        raise NotMappable(f"the native MobileNetV2 rebuild differs from the Hub model (relative error {rel:.3g})")
    base = mobilenet.build_features(image_size, dtype_policy=policy)
    base.set_weights(reference.get_weights())
    return _from_unit_range(base, image_size)


def _from_unit_range(base, image_size: int) -> "keras.Model":
    inputs = keras.Input((image_size, image_size, 3), dtype="float32")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_minus1_1")(inputs)  # Hub [0,1] -> Keras [-1,1]
    return keras.Model(inputs, base(x), name="backbone_native")


def relative_error(model, hub_layer, image_size: int) -> float:
    """Relative L2 distance between ``model``'s features and the Hub model's on synthetic flowers."""
    images = mobilenet.calibration_images(8, image_size, seed=123) * 0.5 + 0.5
    ref = eager_call(hub_layer, tf.constant(images)).numpy().astype(np.float64)
    got = tf.cast(model(tf.constant(images)), tf.float32).numpy().astype(np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


def conv_compute_dtype(model, image_size: int = 224) -> str:
    """The dtype the backbone's convolutions run in, read from the traced graph (not the policy),
    nested functions included."""
    fn = tf.function(lambda x: model(x, training=False))
    graph_def = fn.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    dtypes = {tf.dtypes.as_dtype(n.attr["T"].type).name for n in nodes if n.op in ("Conv2D", "DepthwiseConv2dNative")}
    return ",".join(sorted(dtypes)) or "unknown"


# --- the whole classifier ------------------------------------------------------------------

def build_head(num_classes: int, seed: int) -> "keras.layers.Dense":
    # float32 logits keep softmax/cross-entropy numerically safe under mixed precision.
    return keras.layers.Dense(num_classes, dtype="float32", name="head",
                              kernel_initializer=keras.initializers.GlorotUniform(seed=seed))


def build_classifier(backbone: Backbone, num_classes: int, cfg: RunConfig, input_kind: str = "uint8", head=None):
    """Images -> logits. ``input_kind``: ``uint8`` (0..255, scaled in the model), ``float255``
    (the tutorial's Rescaling layer), or ``unit`` (already in [0, 1], the notebook's /255).
    ``head``: a trained head layer to put on the backbone (featcache's), else a new one."""
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
    if cfg.augment:
        x = augmentation(cfg.seed)(x)
    # Fine-tuning from a layer: batch norm in inference mode, as the tutorial has it (its moving
    # statistics stay the pretrained ones; with folded weights they are the identity).
    features = backbone.layer(x, training=False) if backbone.cut is not None else backbone.layer(x)
    logits = (head or build_head(num_classes, cfg.seed))(features)
    return keras.Model(inputs, logits, name="flowers_classifier")


def augmentation(seed: int) -> "keras.Sequential":
    """--augment: the Keras guide's random flip, rotation and zoom on [0, 1] images, active only
    while training; seeded, each layer with its own seed."""
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.1, seed=seed + 1),
        keras.layers.RandomZoom(0.1, seed=seed + 2),
    ], name="augment")


def head_model(num_classes: int, feature_dim: int, cfg: RunConfig, head=None):
    """The classifier's head alone, on features, initialised exactly as in build_classifier (same
    seed); ``head``: a head layer to use (cutcache's, shared with its fine-tune phase)."""
    inputs = keras.Input((feature_dim,), dtype="float32", name="features")
    return keras.Model(inputs, (head or build_head(num_classes, cfg.seed))(inputs), name="head_on_features")


def compile_classifier(model, cfg: RunConfig) -> None:
    optimizer = keras.optimizers.Adam(cfg.learning_rate)
    if cfg.precision == "mixed" and cfg.mixed_dtype == "float16":
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=cfg.xla_step)


# --- the frozen feature pass (featcache; run by an engine, see engine.py) -------------------

def feature_function(backbone: Backbone, image_size: int, jit: bool = False):
    """uint8 images -> float32 features, traced once for any batch size."""
    @tf.function(jit_compile=jit, input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    def features(images):
        return tf.cast(backbone.layer(tf.cast(images, tf.float32) / 255.0, training=False), tf.float32)

    return features
