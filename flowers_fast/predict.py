"""``python -m flowers_fast predict IMAGE...``: top-k classes for images.

Without ``--checkpoint``: a TF Hub ImageNet classifier (default mobilenet_v2/classification/4;
``random`` = the built-in offline random one, exported on first use) through ``hub.KerasLayer``;
labels from the packaged ``imagenet_labels.txt`` (1001 lines, index 0 "background").

With ``--checkpoint PATH``: a model saved by ``python -m flowers_fast train --save PATH``; class
names from ``classes.txt`` inside (or beside) the checkpoint, else the five flower_photos names;
a ``run.json`` there (RunConfig.to_json) saying naive without --rgb makes the input BGR like training.

TensorFlow is imported only when the command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .clikit import add_knob_flags, given_knobs, positive_int
from .config import HUB_CLASSIFIER, PREDICT, check_openvino_settings, knobs
from .errors import DataError, ModelError, UserError, printable

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

HUB_SIZE = 224
PREDICT_BATCH = 32
DEFAULT_CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


def imagenet_labels() -> list[str]:
    """The 1001 ImageNet labels of the Hub classifiers (index 0: background)."""
    text = resources.files("flowers_fast").joinpath("imagenet_labels.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="top-k classes for images: ImageNet (Hub classifier) or a trained "
                                              "flowers checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, BMP, GIF)")
    p.add_argument("--model-handle", default=HUB_CLASSIFIER, metavar="URL|PATH",
                   help="TF Hub classification model URL ('hub' = mobilenet_v2/classification/4, the default), "
                        "a local Hub SavedModel folder, or 'random' (built-in offline random classifier)")
    p.add_argument("--checkpoint", metavar="PATH", help="a model saved by `python -m flowers_fast train --save "
                                                        "PATH`; predicts flower classes instead of ImageNet")
    p.add_argument("--top", type=positive_int, default=5, help="how many classes to print per image (default 5)")
    p.add_argument("--cache-dir", metavar="PATH", help="where 'random' is exported and Hub downloads are kept "
                                                       "(env FLOWERS_FAST_CACHE; default ~/.cache/flowers_fast)")
    p.add_argument("--calibration-dir", metavar="DIR", help="with --precision int8: images like those to predict "
                                                            "(e.g. the training folder; any depth) to calibrate the "
                                                            "quantization on, a seeded sample of them")
    add_knob_flags(p, PREDICT)  # --engine, --precision, int8's: declared once on RunConfig
    p.set_defaults(func=cmd_predict)
    return p


# --- images ---------------------------------------------------------------------------------

def check_images(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such image file")
        if not p.is_file():
            raise DataError(f"{p}: not a file (a folder?); pass image files")
        out.append(p)
    return out


def read_image(path: Path, size: int | None = None):
    """uint8 RGB [H, W, 3] decoded like the tf.data pipeline (upright by its EXIF orientation, as a
    phone photo shows), or resized (``resize``) when ``size``."""
    from . import data
    from .pipeline import decode_upright
    from .tfkeras import tf

    try:
        # The name as the OS's bytes: one that is not UTF-8 cannot become a tf.string as a str.
        image = decode_upright(tf.io.read_file(os.fsencode(path)), data.exif_orientations([path])[0])
    except (tf.errors.OpError, ValueError) as exc:
        why = re.sub(r"\{\{.*?\}\}|\s*\[Op:.*", "", getattr(exc, "message", "") or str(exc)).strip().splitlines()
        raise DataError(f"{path}: cannot be decoded as an image ({why[0][:120] if why else type(exc).__name__})") \
            from None
    return image if size is None else resize(image, size)


def resize(image, size: int):
    """float32 [size, size, 3] in 0..255: bilinear without antialias, as flowers_fast.pipeline does."""
    from .tfkeras import tf

    image = tf.image.resize(image, [size, size], method="bilinear", antialias=False)
    return tf.clip_by_value(image, 0.0, 255.0)


# --- models ---------------------------------------------------------------------------------

def resolve_classifier(handle: str, cache: Path) -> tuple[str, str]:
    """(loadable handle, weights kind) for the ImageNet classifier; 'random' exports on first use."""
    from . import hubexport
    from .model import CLASSIFICATION, resolve_handle

    if handle == "random" and not (hubexport.classifier_path(cache) / "saved_model.pb").exists():
        print(f"exporting the offline random classifier to {hubexport.classifier_path(cache)} (first use only) ...",
              file=sys.stderr)
    return resolve_handle(handle, cache, CLASSIFICATION)


def load_hub_classifier(handle: str, weights: str = ""):
    """hub.KerasLayer for ``handle`` after checking it outputs ImageNet logits; (layer, labels)."""
    from .model import load_hub_layer, output_shape

    layer = load_hub_layer(handle, name="classifier", weights=weights)
    shape = output_shape(layer, handle, HUB_SIZE, hint="pass a Hub classification model")
    labels = imagenet_labels()
    n = int(shape[-1]) if len(shape) == 2 else -1
    if n == len(labels):
        return layer, labels
    if n == len(labels) - 1:  # a 1000-class model without the background class
        return layer, labels[1:]
    raise ModelError(f"--model-handle {handle}: outputs shape {shape}, expected [batch, {len(labels)}] "
                     "ImageNet logits; pass a classification model (not a feature_vector one), or use "
                     "--checkpoint for a trained flowers model")


def checkpoint_classes(path: Path, n: int) -> list[str]:
    for candidate in (path / "classes.txt", path.parent / "classes.txt"):
        if candidate.is_file():
            names = [line.strip() for line in candidate.read_text(encoding="utf-8").splitlines() if line.strip()]
            if len(names) != n:
                raise ModelError(f"{candidate}: {len(names)} class names but the model has {n} outputs")
            return names
    if n == len(DEFAULT_CLASSES):
        return list(DEFAULT_CLASSES)
    return [f"class {k}" for k in range(n)]


def checkpoint_bgr(path: Path) -> bool:
    """Whether the checkpoint was trained on BGR images (the naive pipeline without --rgb), as
    recorded in ``run.json`` (RunConfig.to_json) inside or beside it; False when unrecorded."""
    import json

    for candidate in (path / "run.json", path.parent / "run.json"):
        if candidate.is_file():
            try:
                cfg = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelError(f"{candidate}: not a readable run configuration ({exc})") from None
            return cfg.get("pipeline") == "naive" and not cfg.get("naive_rgb", False)
    return False


def load_checkpoint(path: str | Path):
    """(model, image size, input kind, class names) for a ``train --save`` SavedModel. Input kind:
    ``uint8`` (tfdata), ``float255`` (tutorial: the model scales) or ``unit`` (naive: [0, 1]);
    ``unit-bgr`` when ``run.json`` says it is a naive model trained on BGR."""
    from .tfkeras import hub, keras

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"--checkpoint {path}: no such file or folder; save one with "
                         "`python -m flowers_fast train --save PATH`")
    try:
        model = keras.models.load_model(str(path), custom_objects={"KerasLayer": hub.KerasLayer}, compile=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ModelError(f"--checkpoint {path}: cannot load as a saved flowers_fast model "
                         f"({type(exc).__name__}: {first})") from None
    shape = model.input_shape
    if isinstance(shape, list) or len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
        raise ModelError(f"--checkpoint {path}: takes input {shape}, not images [batch, S, S, 3] (a head on "
                         "features alone, as featcache --save wrote before it saved the backbone too; train and "
                         "--save it again)")
    dtype = model.inputs[0].dtype
    if dtype.name == "uint8":
        kind = "uint8"
    else:
        kind = "float255" if any(layer.name == "scale" for layer in model.layers) else "unit"
        if kind == "unit" and checkpoint_bgr(path):
            kind = "unit-bgr"
    n = int(model.output_shape[-1])
    return model, int(shape[1]), kind, checkpoint_classes(path, n)


# --- the command ----------------------------------------------------------------------------

def top_k(probs, k: int) -> list[tuple[int, float]]:
    import numpy as np

    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]


def model_function(model, size: int, kind: str):
    """``model(x, training=False)`` as a tf.function with the model's input signature, for an engine."""
    from .tfkeras import tf

    dtype = tf.uint8 if kind == "uint8" else tf.float32

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], dtype)])
    def logits(x):
        return tf.cast(model(x, training=False), tf.float32)

    return logits


@dataclass
class Predictions:
    """What ``predict`` returns: each image's class probabilities (``probs``: [images, classes]),
    the class names, and what produced them."""

    images: list
    probs: "np.ndarray"
    labels: list
    model: str  # the checkpoint or Hub handle, with its weights
    engine: str
    precision: str

    def top(self, k: int = 5) -> "pd.DataFrame":
        """One row per image and rank: path, rank, label, probability."""
        import pandas as pd

        return pd.DataFrame([dict(path=str(path), rank=r + 1, label=self.labels[i], probability=prob)
                             for path, p in zip(self.images, self.probs)
                             for r, (i, prob) in enumerate(top_k(p, min(k, len(self.labels))))])


def calibration_files(folder) -> list[Path]:
    """The images under ``folder`` (any depth, hidden files left out), sorted; a one-line error
    when there are too few to calibrate on and check."""
    from .data import IMAGE_EXTENSIONS

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"--calibration-dir {folder}: not a folder; pass a folder of images like those to predict")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if len(files) < 16:
        raise DataError(f"--calibration-dir {folder}: {len(files)} images; int8 needs at least 16 (half calibrate, "
                        "half check the quantized outputs)")
    return files


def predict(images, checkpoint: str | None = None, model_handle: str = HUB_CLASSIFIER, engine: str = "tf",
            precision: str = "fp32", cache: str | Path | None = None, calibration_dir: str | None = None,
            calibration_images: int = 256, int8_min_cosine: float = 0.95, reuse_quantized: bool = True,
            engine_streams: int = 0, engine_threads: int = 0) -> Predictions:
    """Class probabilities for ``images`` (files or folders) from a ``train --save`` checkpoint, or
    without one from the Hub ImageNet classifier ``model_handle`` (``random``: the offline stand-in).
    ``engine``/``precision`` as ``predict --engine/--precision``; int8 quantizes the whole model
    as ``train --precision int8`` does (quantize.py), on a seeded sample of ``calibration_dir``, checks
    its outputs on others against float32 and stores it for the next call; ``engine_streams``/
    ``engine_threads``: OpenVINO's (``--engine-streams``/``--engine-threads``). Raises UserError
    subclasses with a one-line message on bad input, before loading any model where it can."""
    from . import engine as engines
    from .download import cache_dir

    if engine == "tf" and precision in ("mixed", "int8"):
        raise UserError(f"--precision {precision}: predict runs reduced precision on --engine openvino")
    check_openvino_settings(engine, engine_streams, engine_threads)
    calibration = None
    if precision == "int8":
        if not calibration_dir:
            raise UserError("--precision int8: needs --calibration-dir DIR, images like those to predict (e.g. the "
                            "training folder) to calibrate on")
        calibration = calibration_files(calibration_dir)
    elif engine == "openvino":
        engines.check_precision(precision)  # before loading anything
    images = check_images([str(i) for i in images])
    if checkpoint and not Path(checkpoint).expanduser().exists():
        load_checkpoint(checkpoint)  # its one-line error, before TensorFlow starts
    # A bad --cache-dir, before TensorFlow starts; int8 stores its quantized model there.
    cache_root = cache_dir(cache) if not checkpoint or calibration else None
    from .tfkeras import tf

    # Decode first: a bad image fails in seconds, before any model is loaded. (Decoded again
    # below, a batch at a time, so that many large photos never sit in memory at once.)
    for p in images:
        read_image(p, None)
    if checkpoint:
        model, size, kind, labels = load_checkpoint(checkpoint)
        what = f"checkpoint {checkpoint} ({len(labels)} classes: {', '.join(labels)})"
    else:
        handle, weights = resolve_classifier(model_handle, cache_root)
        model, labels = load_hub_classifier(handle, weights)
        size, kind = HUB_SIZE, "unit"
        what = f"{handle} (weights {weights}), {len(labels)} ImageNet classes"

    def batch_of(paths):
        batch = tf.stack([read_image(p, size) for p in paths])
        if kind == "uint8":
            return tf.cast(tf.round(batch), tf.uint8)
        if kind == "unit":
            return batch / 255.0
        if kind == "unit-bgr":  # the notebook's cv2.imread order, which this model was trained on
            return tf.reverse(batch, axis=[-1]) / 255.0
        return batch

    fn = model_function(model, size, "uint8" if kind == "uint8" else "float")
    if calibration:
        eng = _int8_engine(fn, batch_of, calibration, checkpoint or handle, size, cache_root, calibration_dir,
                           calibration_images, int8_min_cosine, reuse_quantized, engine_streams, engine_threads)
    else:
        eng = engines.make(engine, fn, precision, streams=engine_streams, threads=engine_threads)
    probs = []
    for start in range(0, len(images), PREDICT_BATCH):  # bounded memory however many images are given
        probs.extend(tf.nn.softmax(eng(batch_of(images[start:start + PREDICT_BATCH])), axis=-1).numpy())
    import numpy as np

    return Predictions(list(images), np.asarray(probs), list(labels), what, eng.name, eng.precision)


def _int8_engine(fn, batch_of, files, model_path, size: int, cache: Path, folder, count: int, min_cosine: float,
                 reuse: bool, streams: int = 0, threads: int = 0):
    """OpenVINO on the whole model quantized by quantize.py (train's quantizer and store) on a
    seeded sample of ``files``; its outputs checked against float32 on others of them."""
    from . import engine as engines
    from . import featurestore, quantize
    from .config import RunConfig
    from .model import cosine

    cfg = RunConfig(image_size=size, calibration_images=count, reuse_quantized=reuse)
    calibrate, held_out = quantize.sample(files, count, cfg.seed)

    def batches(paths):
        return [batch_of(paths[i:i + PREDICT_BATCH]).numpy() for i in range(0, len(paths), PREDICT_BATCH)]

    # The whole model's function, not featcache's backbone alone: keyed apart from train's.
    fingerprint = f"{featurestore.model_fingerprint(str(model_path))}/predict"
    q = quantize.quantized_model(lambda: engines.convert(fn), cfg, cache, fingerprint, calibrate,
                                 lambda: batches(calibrate))

    def least_cosine(eng):
        reference = engines.make("tf", fn)
        return min(float(cosine(eng(x), reference(x)).min()) for x in batches(held_out))

    return quantize.checked_engine(q, fn, cache, least_cosine, min_cosine, "outputs",
                                   f"{len(held_out)} images of --calibration-dir {folder}",
                                   "calibrate on more images or use --precision fp32", streams, threads)[0]


def cmd_predict(args) -> int:
    # The knobs' defaults are RunConfig's: flags left out of the command line are absent from args.
    settings = {f.name: f.default for f in knobs(PREDICT)} | given_knobs(args, PREDICT)
    result = predict(args.images, checkpoint=args.checkpoint, model_handle=args.model_handle,
                     cache=args.cache_dir, calibration_dir=args.calibration_dir, **settings)
    k = min(args.top, len(result.labels))
    print(printable(f"predict: {result.model}; engine {result.engine} ({result.precision}); top {k} with softmax "
                    "probabilities"))
    for path, p in zip(result.images, result.probs):
        print(printable(path))  # a newline in a name must not fake a result line; a non-UTF-8 name prints
        for index, prob in top_k(p, k):
            print(f"  {prob:.4g}  {printable(result.labels[index])}")
    return 0
