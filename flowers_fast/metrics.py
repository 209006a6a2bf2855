"""Measuring: epoch timing, throughput on in-memory tensors, memory, FLOPs and device peak."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from .tfkeras import keras, tf


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch; the first one includes tracing and compilation. Also keeps each
    epoch's training loss and accuracy (Keras's logs), the curves --tensorboard draws."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self.logs: list[dict] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.logs.append(dict(logs or {}))

    def curve(self, key: str) -> str:
        """One logged value per epoch, as ``epoch_times_s`` writes them (blank when Keras logged none)."""
        values = [log.get(key) for log in self.logs]
        return " ".join(f"{float(v):.6g}" for v in values) if values and None not in values else ""


def steady(times: list[float]) -> dict:
    """Median/min/max of epochs 2..N: warm-up (epoch 1) excluded. NaN when there is only one."""
    rest = times[1:]
    if not rest:
        return {"steady_epoch_s": float("nan"), "steady_epoch_min_s": float("nan"),
                "steady_epoch_max_s": float("nan")}
    return {"steady_epoch_s": statistics.median(rest), "steady_epoch_min_s": min(rest),
            "steady_epoch_max_s": max(rest)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_gpu_mb() -> float:
    if not tf.config.list_physical_devices("GPU"):
        return float("nan")
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def timed_rate(step, items_per_call: int, min_calls: int = 3, min_seconds: float = 2.0,
               warmup: int = 1) -> tuple[float, float]:
    """(items/s in steady state, warm-up seconds): ``step()`` is called ``warmup`` times untimed,
    then until both ``min_calls`` and ``min_seconds`` are reached."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - t0
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        step()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - start), warm


def interleaved_rates(steps: dict, items_per_call: int, rounds: int = 3,
                      min_seconds: float = 1.5) -> tuple[dict, dict, float]:
    """Items/s of each ``step()`` measured in turns, the order alternating each round, so that a
    machine getting busier or quieter affects all alike: (median rate per name, warm-up seconds
    per name, median over rounds of the first step's rate / the second's; NaN with one step)."""
    warm = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        warm[name] = time.perf_counter() - start
    names, per_round = list(steps), []
    for r in range(rounds):
        rates = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            rates[name] = timed_rate(steps[name], items_per_call, min_calls=1, min_seconds=min_seconds, warmup=0)[0]
        per_round.append(rates)
    medians = {name: statistics.median(r[name] for r in per_round) for name in names}
    ratio = statistics.median(r[names[0]] / r[names[1]] for r in per_round) if len(names) > 1 else float("nan")
    return medians, warm, ratio


def rate_after_first(images: int, seconds: float, first_images: int, first_s: float) -> float:
    """Images/s of a stream after its first batch (``first_images`` ready after ``first_s`` of the
    ``seconds``): its start-up is timed apart, as warm-up is. Over the whole stream when it is only
    one batch."""
    if images > first_images and seconds > first_s:
        return (images - first_images) / (seconds - first_s)
    return images / max(seconds, 1e-9)


def input_only_rate(dataset, batch_size: int) -> float:
    """Images/s of iterating a dataset once with no model (call after the cache is filled), after
    its first batch (rate_after_first, as featcache's pass rate)."""
    n, first, first_s, start = 0, 0, 0.0, time.perf_counter()
    for batch in dataset:
        n += int(tf.shape(batch[0])[0])
        if not first:
            first, first_s = n, time.perf_counter() - start
    return rate_after_first(n, time.perf_counter() - start, first, first_s)


def pass_bound(pass_rate: float, input_rate: float, backbone_rate: float, cores: int) -> dict:
    """What bounds a streamed pass (decode -> backbone), from the two stages measured alone in the
    same process: the slower stage (``feature_pass_bound_*``), and the rate if the two took turns on
    the same cores (``feature_pass_shared_cores_img_s``, 1 / (1/input + 1/backbone)). Each stage
    alone uses every core, so a pass near the shared rate is limited by the cores both need, not
    by either stage; ``feature_pass_limit`` says so, or that neither explains it, below 0.8 of the bound."""
    bound = min(input_rate, backbone_rate)
    shared = 1.0 / (1.0 / input_rate + 1.0 / backbone_rate)
    fraction = pass_rate / bound
    limit = ""
    if fraction < 0.8:
        if pass_rate >= 0.9 * shared:
            limit = (f"shared cores: decoding ({input_rate:.0f} img/s alone) and the backbone ({backbone_rate:.0f} "
                     f"alone) both need the same {cores} cores; taking turns they reach {shared:.0f} img/s, and the "
                     f"pass ran at {pass_rate / shared:.2f} of that")
        else:
            limit = (f"not the stages' rates: the pass ran at {pass_rate / shared:.2f} of the {shared:.0f} img/s that "
                     f"decoding and the backbone reach taking turns on the {cores} cores")
    return {"feature_pass_bound_img_s": bound, "feature_pass_bound_stage": "input" if input_rate < backbone_rate
            else "backbone", "feature_pass_bound_fraction": fraction, "feature_pass_shared_cores_img_s": shared,
            "feature_pass_limit": limit}


def model_only_train_rate(model, image_size: int, batch_size: int, num_classes: int, input_dtype,
                          min_seconds: float = 4.0, min_calls: int = 3) -> tuple[float, float]:
    """Train-step images/s on one in-memory synthetic batch (no input pipeline), and warm-up s.

    Like tf_cnn_benchmarks' synthetic mode: it isolates the model from the input. It updates
    the weights, so call it after training and evaluation."""
    rng = np.random.default_rng(0)
    if input_dtype == tf.uint8:
        x = tf.constant(rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8))
    else:
        x = tf.constant(rng.random((batch_size, image_size, image_size, 3), dtype=np.float32))
    y = tf.constant(rng.integers(0, num_classes, batch_size), tf.int32)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    # Split the global batch over the replicas, as fit does; a plain iterator would hand every
    # replica the whole batch (replicas x the work, counted once).
    iterator = iter(model.distribute_strategy.experimental_distribute_dataset(dataset))
    train_function = model.make_train_function()
    if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Each call all-reduces with the other workers, so they must all make the same number of
        # calls: a count, not each worker's own clock (one extra call would wait forever).
        min_calls, min_seconds = max(min_calls, 5), 0.0
    return timed_rate(lambda: train_function(iterator), batch_size, min_calls=min_calls, min_seconds=min_seconds)


def forward_flops_per_image(layer, image_size: int) -> float:
    """FLOPs of one forward pass at batch 1, counted from the graph, not typed in: by TensorFlow's
    profiler (functions inlined, variables frozen), or, where TensorFlow's private freezing
    function is gone, from the convolutions and matmuls of OpenVINO's conversion."""
    fn = tf.function(lambda x: layer(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3], tf.float32))
    try:
        # Freezing has no public TF2 API (TF Model Garden's FLOP counter imports this one too); the
        # profiler is public under tf.compat.v1.
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    except ImportError:
        return openvino_flops(concrete)
    frozen = convert_variables_to_constants_v2(concrete)
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    opts = builder(builder.float_operation()).with_empty_output().build()
    return float(tf.compat.v1.profiler.profile(frozen.graph, options=opts).total_float_ops)


def openvino_flops(concrete) -> float:
    """2 x the multiply-adds of the convolutions and matmuls in OpenVINO's conversion of a concrete
    function (public APIs only); element-wise ops, a few percent of MobileNetV2's, are not counted."""
    from .engine import import_openvino

    model = import_openvino().convert_model(concrete)
    macs = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Convolution", "GroupConvolution"):
            out = list(op.get_output_shape(0))  # N, C_out, H, W
            weights = list(op.input(1).get_shape())  # [G,] C_out/G, C_in/G, kH, kW
            macs += int(np.prod(out)) * int(np.prod(weights[-3:]))
        elif kind == "MatMul":
            a, b = (list(op.input(i).get_shape()) for i in (0, 1))
            k = a[-2] if op.get_attributes().get("transpose_a") else a[-1]
            macs += int(np.prod(list(op.get_output_shape(0)))) * int(k)
    return 2.0 * macs


def matmul_peak_flops(device: str, dtype: str, n: int = 4096, repeats: int = 3) -> float:
    """Dense n x n matmul FLOP/s on ``device`` at ``dtype``, median of ``repeats`` after one warm-up."""
    with tf.device("/GPU:0" if device == "gpu" else "/CPU:0"):
        a = tf.random.uniform([n, n], dtype=tf.float32)
        b = tf.random.uniform([n, n], dtype=tf.float32)
        a, b = tf.cast(a, dtype), tf.cast(b, dtype)
        mm = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b)[0, :1], tf.float32)))
        mm(a, b).numpy()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mm(a, b).numpy()
            times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)
