"""int8 for the OpenVINO engine: NNCF's post-training quantization, calibrated on training
images, checked against float32, and kept on disk so a second run does not quantize again.

NNCF (the OpenVINO project's compression library) inserts FakeQuantize operations whose ranges
come from the calibration images' activations; OpenVINO's CPU plugin then runs the quantized
convolutions in int8 (with VNNI or AMX where the CPU has them, plain AVX2/AVX-512 otherwise).
Only training images calibrate: the test split never shapes the model it is scored on.

A quantized model is stored under a key of everything that decides it, in the spirit of
``featurestore``: the SavedModel's fingerprint, the image size and decoding, the OpenVINO and
NNCF versions, and the calibration files (names, sizes, modification times).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import featurestore
from .config import RunConfig
from .errors import OutputError, UnsupportedError
from .outputs import temp_dir

FORMAT = 1  # bump when the quantization settings change


@dataclass
class Quantized:
    model: object  # openvino.Model with FakeQuantize operations
    seconds: float  # calibration and quantization (loading, when reused)
    reused: bool
    info: dict  # what was stored beside it (e.g. the held-out cosine)


def versions() -> dict:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("openvino", "nncf")}


def key(cfg: RunConfig, fingerprint: str, files) -> tuple[str, dict]:
    parts = dict(format=FORMAT, model=fingerprint, image_size=cfg.image_size, dct_decode=cfg.dct_decode,
                 **versions(), **featurestore.files_parts(files))
    return featurestore.digest_of(parts), parts


def folder(cache: Path, digest: str) -> Path:
    return Path(cache) / "quantized" / digest


def load(cache: Path, digest: str):
    """(openvino.Model, stored info) under ``digest``, or None (absent or damaged: quantize again)."""
    from .engine import core

    where = folder(cache, digest)
    try:
        info = json.loads((where / "info.json").read_text())
        return core().read_model(str(where / "model.xml")), info
    except (OSError, ValueError, RuntimeError):
        return None


def save(cache: Path, digest: str, model, info: dict) -> None:
    """Store atomically: written into a temporary folder beside it, then renamed into place."""
    from .engine import import_openvino

    where = folder(cache, digest)
    tmp = None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(where.parent, digest + ".")
        import_openvino().save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        if where.exists():  # another run stored it meanwhile: theirs is as good
            shutil.rmtree(tmp)
            return
        os.replace(tmp, where)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"--precision int8: cannot store the quantized model under {where.parent} "
                          f"({exc.strerror or exc}); free disk space or pass another --cache-dir") from None


def quantize(model, batches: list[np.ndarray]):
    """NNCF's post-training quantization of an ``openvino.Model`` on uint8 image ``batches``."""
    try:
        import nncf
    except ImportError:
        raise UnsupportedError("--precision int8: NNCF is not installed; pip install 'flowers_fast[int8]' (or "
                               "pip install nncf), or use --precision fp32 or mixed") from None

    return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                         preset=nncf.QuantizationPreset.PERFORMANCE)


def quantized_model(convert, cfg: RunConfig, cache: Path, fingerprint: str, files, batches) -> Quantized:
    """The quantized model, from the store when the key matches, else ``convert()`` (the float
    ``openvino.Model``) calibrated on ``batches()`` (the decoded ``files``, batched); store it with
    ``save`` once it has passed its check."""
    digest, parts = key(cfg, fingerprint, files)
    start = time.perf_counter()
    stored = load(cache, digest) if cfg.reuse_quantized else None
    if stored is not None:
        return Quantized(stored[0], time.perf_counter() - start, True, stored[1])
    model = quantize(convert(), list(batches()))
    return Quantized(model, time.perf_counter() - start, False, dict(parts, digest=digest))


def checked_engine(q: Quantized, fn, cache: Path, least_cosine, min_cosine: float, what: str, where: str,
                   fix: str, streams: int = 0, threads: int = 0):
    """(OpenVINO engine on ``q``'s model, its least cosine vs float32): never an engine labelled
    int8 that did not run int8, nor one whose cosine (the stored one, else ``least_cosine(engine)``)
    is below ``min_cosine``; stored once it has passed. ``what``/``where``/``fix`` word the error;
    ``streams``/``threads``: the engine's (engine.make)."""
    from .engine import make

    eng = make("openvino", fn, "int8", model=q.model, streams=streams, threads=threads)
    if eng.precision != "int8":
        raise UnsupportedError(f"--precision int8: OpenVINO ran the quantized model's convolutions in {eng.precision}"
                               ", not int8; use --precision fp32")
    cosine = q.info.get("cosine")
    if cosine is None:
        cosine = least_cosine(eng)
    if cosine < min_cosine:
        raise UnsupportedError(f"--precision int8: the quantized {what} moved too far from float32's (least cosine "
                               f"{cosine:.4f} on {where}, below --int8-min-cosine {min_cosine}); {fix}")
    if not q.reused:
        save(cache, q.info["digest"], q.model, dict(q.info, cosine=cosine))
    return eng, cosine


def sample(files, count: int, seed: int, held_out: int = 64) -> tuple[list, list]:
    """A seeded draw from the training ``files``: up to ``count`` to calibrate (at most half of
    them), and up to ``held_out`` others to check the quantized features on."""
    order = np.random.default_rng([seed, 8]).permutation(len(files))
    calibrate = sorted(int(i) for i in order[:min(count, len(files) // 2)])
    rest = order[len(calibrate):]
    return [files[i] for i in calibrate], [files[int(i)] for i in sorted(rest[:held_out])]
