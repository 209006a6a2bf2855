"""``--profile DIR``: a TensorFlow Profiler trace of a few steady-state train steps.

The trace is taken after every timed part of the run (epochs, evaluation, breakdown) and after the
memory peak is read, so the row's figures are those of an unprofiled run (``profiled_inside_timing``
says so). The steps are extra steps on the already-traced train function: steady state, never the
first epoch's tracing. The model's weights and optimizer state are put back afterwards, so the
trained model is the one the epochs made. featcache also traces a slice of its feature pass (decode
and the frozen backbone on its engine), where its time goes.

The trace lands where TensorBoard's Profile tab looks: ``DIR/plugins/profile/<timestamp>/<host>.xplane.pb``
(``tensorboard --logdir DIR``; the tab is the ``tensorboard-plugin-profile`` package, installed by
``pip install 'flowers_fast[tensorboard]'``).
"""

from __future__ import annotations

import time
from pathlib import Path

STEPS = 5  # enough for the trace viewer and the tf.data analysis to show a steady step; under a second at 96 px
FEATURE_BATCHES = 2  # featcache: batches of the feature pass in the trace


def check_dir(path: str | Path, flag: str = "--profile") -> Path:
    """Before any work: ``path`` is a folder we can create and write (an OutputError naming ``flag``)."""
    from .outputs import Outputs

    return Outputs().folder(path, flag)


def trace_files(logdir: str | Path) -> list[Path]:
    """Traces under ``logdir`` in the layout the profiler plugin lists: ``plugins/profile/<run>/<host>.xplane.pb``."""
    return sorted(Path(logdir).glob("plugins/profile/*/*.xplane.pb"))


def fit_steps(model, x, y=None, batch_size=None, steps: int = STEPS) -> None:
    """``steps`` more train steps of ``model`` on its training input (a dataset, or arrays with ``y``)."""
    from .tfkeras import tf

    if isinstance(x, tf.data.Dataset):
        model.fit(x.take(steps), epochs=1, verbose=0)
    else:
        n = min(len(x), steps * batch_size)
        model.fit(x[:n], y[:n], batch_size=batch_size, epochs=1, verbose=0, shuffle=False)


def batch_steps(model, image_size: int, batch_size: int, num_classes: int, steps: int = STEPS) -> None:
    """modelonly: ``steps`` train steps on one in-memory batch of random uint8 images, as it is timed."""
    import numpy as np

    from .tfkeras import tf

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    y = rng.integers(0, num_classes, batch_size).astype(np.int32)
    model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(steps), epochs=1, verbose=0)


def feature_slice(eng, files, labels, cfg, batches: int = FEATURE_BATCHES) -> None:
    """featcache: the first ``batches`` batches of the feature pass, decoded and run through ``eng``."""
    from . import pipeline

    n = batches * cfg.feature_batch
    stream = pipeline.feature_stream(files[:n], labels[:n], cfg, cfg.feature_batch)
    eng.run((images, None) for images, _, _ in stream)


def _optimizer_variables(model) -> list:
    opt = getattr(model, "optimizer", None)
    if opt is None:
        return []
    variables = opt.variables
    return list(variables() if callable(variables) else variables)


def trace(logdir: str | Path, steps, extra=None) -> dict:
    """Profile ``extra()`` (featcache's feature slice) and then ``steps()`` (train steps; a callable
    that returns the model it trained, or None) into ``logdir``; put the model back as it was.
    Returns the row's columns: the trace file, what was traced and that it was outside the timing."""
    from .tfkeras import tf

    model = getattr(steps, "model", None)
    saved = (model.get_weights(), [v.numpy() for v in _optimizer_variables(model)]) if model is not None else None
    logdir = Path(logdir).expanduser()
    before = set(trace_files(logdir))
    start = time.perf_counter()
    tf.profiler.experimental.start(str(logdir))
    try:
        if extra is not None:
            extra()
        steps()
    finally:
        tf.profiler.experimental.stop()
    seconds = time.perf_counter() - start
    if saved is not None:
        model.set_weights(saved[0])
        for variable, value in zip(_optimizer_variables(model), saved[1]):
            variable.assign(value)
    new = [p for p in trace_files(logdir) if p not in before]
    return {"profile_trace": str(new[-1]) if new else "", "profile_steps": STEPS,
            "profile_feature_batches": FEATURE_BATCHES if extra is not None else 0, "profile_s": seconds,
            "profiled_inside_timing": False}


class Steps:
    """A deferred call of one of the step functions above, with the model it trains (to restore it)."""

    def __init__(self, model, fn, *args, **kwargs):
        self.model, self.fn, self.args, self.kwargs = model, fn, args, kwargs

    def __call__(self):
        self.fn(self.model, *self.args, **self.kwargs)
