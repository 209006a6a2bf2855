"""Inference engines for a frozen model: TensorFlow, or OpenVINO's CPU plugin.

featcache's feature pass and ``predict`` hand an engine a ``tf.function`` with one input
signature (for the feature pass: uint8 images -> float32 features, the cast and /255 inside)
and feed it batches. ``tf`` calls the function; ``openvino`` converts it once with
``openvino.convert_model`` and runs the result. Conversion goes through the function's
concrete function, not the SavedModel folder: ``convert_model(folder)`` converts only a
SavedModel's signatures, and the project's random export has none (the result would be a model
with no inputs, without an error).

OpenVINO runs with the THROUGHPUT hint (on 2 cores: 2 streams x 1 thread) and an
``AsyncInferQueue`` with as many requests as the plugin asks for, which keeps both streams busy
and overlaps feeding with inference; ``--engine-streams 1`` runs one request on all threads (the
LATENCY hint), which holds one stream's activations instead of two, and ``--engine-threads``
caps the threads (the rest of the cores are left to decoding). Precision is asked with
``INFERENCE_PRECISION_HINT`` and read back from the executed graph, because the plugin silently runs float32 when bfloat16 is
asked on a CPU without native bf16 (AVX512_BF16 or AMX). Measured on a 2-core AMD EPYC; see
the README's results.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .config import MAX_ISA
from .errors import UnsupportedError

# OpenVINO's element type names -> the dtype names used everywhere else in the row.
_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "u8": "int8", "i8": "int8"}
# --precision -> INFERENCE_PRECISION_HINT. int8: the quantized model's FakeQuantize operations put
# its convolutions in int8; what is left (a few element-wise operations) stays float32.
_HINTS = {"fp32": "f32", "mixed": "bf16", "int8": "f32"}
_CORE = None


def import_openvino():
    """``import openvino`` with its telemetry off, for this process only.

    ``import openvino`` itself starts OpenVINO's usage telemetry (it counts as consented when no
    consent file exists), writes ~/intel/openvino_ga_cid and starts sender threads. With the
    ``openvino_telemetry`` package hidden, OpenVINO falls back to its bundled no-op stub."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    return openvino


def core():
    global _CORE
    if _CORE is None:
        _CORE = import_openvino().Core()
    return _CORE


def cpu_capabilities() -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES for the CPU, e.g. ['FP32', 'INT8', 'BIN', 'EXPORT_IMPORT']
    on an AVX2 CPU; 'BF16' appears where the CPU has native bf16 (AVX512_BF16 or AMX)."""
    return [str(c) for c in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def isa_capped_below(level: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (``--max-isa``) keeps oneDNN below ``level`` (a MAX_ISA name)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "all").lower()
    return cap in MAX_ISA and cap != "all" and MAX_ISA.index(cap) < MAX_ISA.index(level)


def cpu_has_bf16() -> bool:
    # OpenVINO reports the CPU's bf16 even when oneDNN may not use it (--max-isa below it).
    return "BF16" in cpu_capabilities() and not isa_capped_below("avx512_core_bf16")


def check_precision(precision: str, flag: str = "--engine openvino --precision mixed") -> None:
    """An UnsupportedError when ``precision`` asks OpenVINO for bf16 on a CPU without it: OpenVINO
    would run float32 without a word, and a row labelled bf16 would be a copy of the fp32 one."""
    if precision == "mixed" and not cpu_has_bf16():
        raise UnsupportedError(f"{flag}: this CPU has no native bfloat16 (OpenVINO CPU capabilities: "
                               f"{', '.join(cpu_capabilities())}), so OpenVINO would silently run float32; "
                               "use --precision fp32")


@dataclass
class Engine:
    """One compiled function. ``precision`` is what its convolutions ran in (float32, bfloat16);
    ``setup_s`` the conversion and compilation (OpenVINO) seconds; ``details`` the settings the
    runtime chose."""

    name: str
    precision: str
    setup_s: float
    call: Callable[[Any], np.ndarray]  # one batch -> outputs (synchronous)
    run: Callable[[Iterable], list]  # [(batch, meta), ...] -> [(outputs, meta), ...] in input order
    details: dict = field(default_factory=dict)

    def __call__(self, batch) -> np.ndarray:
        return self.call(batch)


def make(name: str, fn, precision: str = "fp32", compute_dtype: str = "float32", model=None, streams: int = 0,
         threads: int = 0) -> Engine:
    """An engine for ``fn`` (a ``tf.function`` with an ``input_signature``). ``precision`` is the
    --precision knob; for ``tf`` the function already carries its precision (``compute_dtype``).
    OpenVINO only: ``model``, an ``openvino.Model`` of ``fn`` to run instead of converting it
    (the quantized one, for int8); ``streams``/``threads``, --engine-streams and --engine-threads."""
    if name == "tf":
        def call(batch):
            return fn(batch).numpy()

        return Engine("tf", compute_dtype, 0.0, call, lambda batches: [(call(b), m) for b, m in batches])
    if name == "openvino":
        return _openvino(fn, precision, model, streams, threads)
    raise ValueError(name)


# --- OpenVINO ---------------------------------------------------------------------------------

def convert(fn):
    """``tf.function`` -> ``openvino.Model`` (weights frozen into constants), checked to have one
    input and one output."""
    ov = import_openvino()
    model = ov.convert_model(fn.get_concrete_function())
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise RuntimeError(f"OpenVINO conversion gave {len(model.inputs)} inputs and {len(model.outputs)} outputs, "
                           "expected 1 and 1")
    return model


def runtime_precision(compiled) -> str:
    """The precision most convolutions and matmuls run in, read from the executed graph."""
    counts = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in ("Convolution", "FullyConnected", "MatMul"):
            counts[info["runtimePrecision"].astype(str)] += 1
    if not counts:
        return _DTYPES.get(str(compiled.get_property("INFERENCE_PRECISION_HINT")), "unknown")
    precision = counts.most_common(1)[0][0]
    return _DTYPES.get(precision, precision)


def compile_model(model, precision: str = "fp32", streams: int = 0, threads: int = 0):
    """Compile for the CPU at ``precision`` (fp32 or mixed = bf16); the precision is always set,
    since a bf16-capable CPU defaults to bf16. ``streams``: 0 = the THROUGHPUT hint's choice, 1 =
    the LATENCY hint (one request on every thread), N = N streams; ``threads``: 0 = every core."""
    check_precision(precision)
    props = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY" if streams == 1 else
             "THROUGHPUT"}
    if streams > 1:
        props["NUM_STREAMS"] = streams
    if threads:
        props["INFERENCE_NUM_THREADS"] = threads
    return core().compile_model(model, "CPU", props)


def settings_text(eng: Engine) -> str:
    """What the runtime chose for ``eng``, in a row's words ("" for TensorFlow): e.g.
    "THROUGHPUT: 2 streams, 2 threads, 2 requests"."""
    d = eng.details
    if not d:
        return ""
    parts = [f"{d[k]} {word}" for k, word in (("NUM_STREAMS", "streams"), ("INFERENCE_NUM_THREADS", "threads"),
                                               ("OPTIMAL_NUMBER_OF_INFER_REQUESTS", "requests")) if k in d]
    return f"{d.get('PERFORMANCE_HINT', '?')}: {', '.join(parts)}"


def _details(compiled) -> dict:
    out = {}
    for key in ("PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "OPTIMAL_NUMBER_OF_INFER_REQUESTS"):
        try:
            out[key] = str(compiled.get_property(key))
        except RuntimeError:  # a property this plugin version does not have
            pass
    return out


def _openvino(fn, precision: str, model=None, streams: int = 0, threads: int = 0) -> Engine:
    ov = import_openvino()
    check_precision(precision)
    start = time.perf_counter()
    compiled = compile_model(convert(fn) if model is None else model, precision, streams, threads)
    setup = time.perf_counter() - start
    request = compiled.create_infer_request()
    jobs = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    def as_array(batch):
        return batch.numpy() if hasattr(batch, "numpy") else np.asarray(batch)

    def call(batch):
        return request.infer({0: as_array(batch)})[0].copy()

    def run(batches):
        queue = ov.AsyncInferQueue(compiled, jobs)
        done: dict[int, tuple] = {}

        def finished(req, userdata):
            index, meta = userdata
            # The request's output tensor is reused by its next inference: copy it out.
            done[index] = (req.get_output_tensor(0).data.copy(), meta)

        queue.set_callback(finished)
        count = 0
        for batch, meta in batches:
            # Waits for a free request; copies the input, so the caller may reuse its buffer.
            queue.start_async({0: as_array(batch)}, (count, meta))
            count += 1
        queue.wait_all()
        return [done[i] for i in range(count)]

    return Engine("openvino", runtime_precision(compiled), setup, call, run, _details(compiled))


def matmul_peak_flops(dtype: str, n: int = 4096, repeats: int = 3) -> float:
    """Dense n x n matmul FLOP/s on OpenVINO's CPU plugin at ``dtype`` (float32 or bfloat16),
    median of ``repeats`` after one warm-up: the same kernels library the engine runs."""
    ov = import_openvino()
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], ov.Type.f32)
    b = ops.constant(rng.random((n, n), dtype=np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a])
    hint = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    compiled = core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    x = rng.random((n, n), dtype=np.float32)
    request.infer({0: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer({0: x})
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / float(np.median(times))
