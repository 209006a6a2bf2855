"""What machine a result came from, and measurements that belong to the machine, not the run.

``host_facts()`` runs in the sweep's parent without importing TensorFlow: CPU brand and the ISA
flags that decide bf16/AMX speed (py-cpuinfo), cores and RAM (psutil), OS, NVIDIA GPUs and
driver (``nvidia-smi``, when present), and the installed versions of the packages that do the
work (``importlib.metadata``). Every row of a sweep carries them, with ``machine_id``: a short
hash of the hardware and OS facts, by which ``bench report`` keeps machines apart.

``Measured`` keeps per-machine measurements (the dense matmul peak, a model's counted FLOPs)
in the cache, keyed by machine and TensorFlow version, so that each worker of a sweep does not
spend seconds re-measuring them; each row says when its value was measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

from flowers_fast.outputs import atomic_write

# The ISA extensions that change how fast this job runs on a CPU: AVX-512 and its bf16 and
# VNNI parts (oneDNN's bf16 kernels), AMX (bf16/int8 matrix tiles).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")
# Installed distribution names per package (the first one found is reported).
PACKAGES = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly"),
    "tf_keras": ("tf-keras", "tf_keras"),
    "tensorflow_hub": ("tensorflow-hub", "tensorflow_hub"),
    "numpy": ("numpy",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
               "opencv-contrib-python"),
}
# The facts that identify a machine (not versions: upgrading TensorFlow keeps the machine).
FINGERPRINT = ("cpu_brand", "cpu_isa", "cpu_logical_cores", "cpu_physical_cores", "ram_gb", "os", "cpu_arch",
               "gpu_names")


def _version(names: tuple[str, ...]) -> str:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""


def _cpu() -> dict:
    import cpuinfo  # py-cpuinfo2, the maintained py-cpuinfo (pytest-benchmark uses it too)

    info = cpuinfo.get_cpu_info()
    flags = set(info.get("flags", ()))
    return {"cpu_brand": info.get("brand_raw", "") or platform.processor(),
            "cpu_vendor": info.get("vendor_id_raw", ""),
            "cpu_arch": info.get("arch_string_raw", "") or platform.machine(),
            "cpu_isa": " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + "/".join(ISA_FLAGS[:3])}


def _os() -> str:
    try:
        name = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        name = ""
    return f"{platform.system()} {name}".strip() if name else f"{platform.system()} {platform.release()}"


def _gpus() -> dict:
    """NVIDIA GPUs and driver from nvidia-smi (no TensorFlow needed); none when it is absent."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"gpu_names": "none", "gpu_driver": ""}
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {"gpu_names": "none (nvidia-smi failed)", "gpu_driver": ""}
    rows = [[p.strip() for p in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    rows = [r for r in rows if len(r) == 2]
    if out.returncode != 0 or not rows:
        return {"gpu_names": "none (nvidia-smi found no GPU)", "gpu_driver": ""}
    names = [r[0] for r in rows]
    shown = "; ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    return {"gpu_names": shown, "gpu_driver": rows[0][1]}


def host_facts() -> dict:
    """This machine's facts as CSV columns (see the module docstring); no TensorFlow import."""
    import psutil

    facts = _cpu()
    facts.update(cpu_logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 0,
                 cpu_physical_cores=psutil.cpu_count(logical=False) or 0,
                 ram_gb=round(psutil.virtual_memory().total / 2**30, 1), os=_os(), kernel=platform.release())
    facts.update(_gpus())
    for package, names in PACKAGES.items():
        facts[f"{package}_version"] = _version(names)
    facts["machine_id"] = fingerprint(facts)
    return facts


def fingerprint(facts: dict) -> str:
    """A short stable id of the hardware and OS (RAM rounded to whole GB): equal on the same machine."""
    parts = {k: (round(float(facts.get(k) or 0)) if k == "ram_gb" else str(facts.get(k, ""))) for k in FINGERPRINT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def tf_build_facts() -> dict:
    """CUDA and cuDNN that this TensorFlow was built with (call where TensorFlow is imported)."""
    import tensorflow as tf

    info = tf.sysconfig.get_build_info()
    cuda = info.get("is_cuda_build", False)
    return {"tf_cuda_build": str(info.get("cuda_version", "")) if cuda else "none",
            "tf_cudnn_build": str(info.get("cudnn_version", "")) if cuda else "none"}


class Measured:
    """Measurements of this machine kept in ``<cache>/machine/<machine_id>-tf<version>.json``.

    ``get(key, measure)`` returns the stored value and when it was measured, measuring (and
    storing) it first when absent. Workers of one sweep run one at a time; the file is replaced
    atomically, so a concurrent sweep can at worst measure again."""

    def __init__(self, cache: Path, machine_id: str, tf_version: str):
        self.path = Path(cache) / "machine" / f"{machine_id}-tf{tf_version}.json"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str, measure: Callable[[], float]) -> tuple[float, str]:
        entry = self._read().get(key)
        if isinstance(entry, dict) and isinstance(entry.get("value"), (int, float)) and entry.get("measured"):
            return float(entry["value"]), str(entry["measured"])
        value = float(measure())
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        data = self._read()
        data[key] = {"value": value, "measured": when}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(data, indent=1))
        except OSError:
            pass  # a read-only cache only costs the next worker a new measurement
        return value, when

    def forget(self) -> None:
        """Drop this machine's stored measurements (``bench run --remeasure``)."""
        self.path.unlink(missing_ok=True)
