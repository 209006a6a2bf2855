"""TensorFlow process-global state, set once at process start.

Visible devices, oneDNN kernels, precision policy and XLA auto-clustering are global in TensorFlow and
cannot be undone inside a process, so each benchmark configuration runs in its own
subprocess and calls :func:`setup` first.
"""

from __future__ import annotations

import os
import platform
import sys

from .config import RunConfig
from .errors import DeviceError


def hide_gpus_early() -> None:
    """Hide GPUs before TensorFlow is imported (cheapest, and nothing gets allocated)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    # Otherwise a CUDA build of TensorFlow logs a scary cuInit error on every CPU run.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def set_onednn(choice: str) -> None:
    """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads: ``on``/``off`` set it before that
    (``auto`` leaves TensorFlow's default, or the user's own setting, alone)."""
    if choice == "auto":
        return
    if "tensorflow" in sys.modules:
        wanted = choice == "on"
        if onednn_enabled() not in (wanted, None):
            raise RuntimeError(f"--onednn {choice}: TensorFlow is already loaded with oneDNN "
                               f"{'on' if not wanted else 'off'}; set it before TensorFlow is imported")
        return
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if choice == "on" else "0"


def set_max_isa(choice: str) -> None:
    """oneDNN reads ONEDNN_MAX_CPU_ISA once, when TensorFlow's or OpenVINO's CPU kernels load:
    set it before either (``all`` leaves the user's own setting, if any, alone)."""
    if choice == "all":
        return
    loaded = [m for m in ("tensorflow", "openvino") if m in sys.modules]
    if loaded and os.environ.get("ONEDNN_MAX_CPU_ISA", "").lower() != choice:
        raise RuntimeError(f"--max-isa {choice}: {' and '.join(loaded)} already loaded; set it before they are imported")
    os.environ["ONEDNN_MAX_CPU_ISA"] = choice.upper()


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its oneDNN kernels in this process (None when it cannot say)."""
    try:
        # TensorFlow's own answer; there is no public API for it (its oneDNN guide uses this one).
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def setup(cfg: RunConfig) -> None:
    """Apply the device and oneDNN choices; the precision is handled per model (see model.py). With
    --strategy multiworker, also find the cluster, make SIGTERM/Ctrl-C end the process at any
    stage, and bound the cluster's registration (cluster.setup)."""
    if cfg.device == "cpu":
        hide_gpus_early()
    set_onednn(cfg.onednn)
    set_max_isa(cfg.max_isa)
    if cfg.strategy == "multiworker":
        from . import cluster

        cluster.setup(cfg)
    from .tfkeras import tf

    gpus = tf.config.list_physical_devices("GPU")
    if cfg.device == "gpu":
        if not gpus:
            raise DeviceError("--device gpu: TensorFlow sees no GPU on this machine; use --device cpu")
        for gpu in gpus:
            # Grow on demand so peak GPU memory reflects what the run needs.
            tf.config.experimental.set_memory_growth(gpu, True)
    else:
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            pass  # already initialised without GPUs
    if cfg.device == "cpu" and cfg.logical_cpus > 1:
        from .distribute import split_cpu

        split_cpu(cfg.logical_cpus)
    # XLA only where a configuration asks for it (jit_compile), never auto-clustered.
    tf.config.optimizer.set_jit(False)


def gpu_available() -> bool:
    from .tfkeras import tf

    return bool(tf.config.list_physical_devices("GPU"))


def device_name(device: str) -> str:
    """CPU model or GPU name, for the report."""
    if device == "gpu":
        from .tfkeras import tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return details.get("device_name", gpus[0].name)
        return "none"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
