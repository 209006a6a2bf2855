"""featcache's features kept on disk between runs (``--reuse-features``).

A run's features are stored under a key of everything that decides them: the model (its
SavedModel fingerprint), the engine and its library version, the precision, the device, the
image size and decoding, and every file with its size and modification time. A later run with
the same key loads them instead of running the feature pass, which makes tuning the head
(learning rate, epochs) nearly free. Any change to the model, the engine, the precision or a
single file gives a new key, so a stale file is never read.

A multiworker run with ``--shard-store`` also shares its sharded feature pass through a folder that
every task sees (:func:`save_shard`, :func:`load_shards`): each task's shard is one file under
the run's id, complete only once its atomic rename lands.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np

from .config import RunConfig
from .errors import ClusterError, OutputError
from .outputs import atomic_open, atomic_write

FORMAT = 1  # bump when the decoding or the stored layout changes


def model_fingerprint(handle: str) -> str:
    """The SavedModel's fingerprint (TensorFlow's, from fingerprint.pb, which hashes the graph and
    the checkpoint); for a model saved without one, a hash of its graph and variable index."""
    from .tfkeras import hub, tf

    path = Path(hub.resolve(handle) if re.match(r"^https?://", handle) else handle)
    if (path / "fingerprint.pb").exists():
        return tf.saved_model.experimental.read_fingerprint(str(path)).singleprint()
    digest = hashlib.sha256()
    for part in [path / "saved_model.pb", *sorted((path / "variables").glob("*.index"))]:
        digest.update(part.read_bytes())
    return digest.hexdigest()


def engine_version(engine: str) -> str:
    if engine == "openvino":
        from .engine import import_openvino

        return "openvino " + import_openvino().__version__
    from .tfkeras import tf

    return "tensorflow " + tf.__version__


def files_parts(files) -> dict:
    """What a key takes from ``files``: a hash of every file's name, size and modification time,
    and their count (a changed, added or removed file changes it)."""
    listing = []
    for f in sorted(files):
        st = os.stat(f)
        listing.append([str(f), st.st_size, st.st_mtime_ns])
    return dict(files=hashlib.sha256(json.dumps(listing).encode()).hexdigest(), num_files=len(listing))


def digest_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def key(cfg: RunConfig, handle: str, compute_dtype: str, files) -> tuple[str, dict]:
    """(hex key, what it was made of) for the features of ``files`` under ``cfg``."""
    parts = dict(format=FORMAT, model=model_fingerprint(handle), engine=cfg.engine,
                 engine_version=engine_version(cfg.engine), precision=cfg.precision, compute_dtype=compute_dtype,
                 device=cfg.device, image_size=cfg.image_size, dct_decode=cfg.dct_decode,
                 xla_backbone=cfg.xla_backbone, **files_parts(files))
    return digest_of(parts), parts


def path(cache: Path, digest: str) -> Path:
    return Path(cache) / "features" / f"{digest}.npz"


def load(cache: Path, digest: str) -> tuple[dict[str, np.ndarray], str, float] | None:
    """({file: features}, the precision they were computed in, their least cosine to TensorFlow
    float32's, NaN if not measured) stored under ``digest``, or None. Files missing from it did not
    decode."""
    p = path(cache, digest)
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as stored:
            cosine = float(stored["cosine"]) if "cosine" in stored.files else float("nan")
            return dict(zip(stored["files"].tolist(), stored["features"])), str(stored["precision"]), cosine
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # unreadable (damaged on disk): the pass runs again and replaces it


def save(cache: Path, digest: str, parts: dict, files, features: np.ndarray, precision: str,
         cosine: float = float("nan")) -> Path:
    """Store ``features`` (rows aligned with ``files``; computed in ``precision``, ``cosine`` from
    TensorFlow float32's) atomically, with the key's parts beside them."""
    p = path(cache, digest)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(p, "wb") as f:
            np.savez(f, files=np.asarray(list(files), dtype=str), features=features, precision=np.asarray(precision),
                     cosine=np.asarray(cosine))
        atomic_write(p.with_suffix(".json"), json.dumps(parts, indent=1, sort_keys=True))
    except OSError as exc:
        raise OutputError(f"--reuse-features: cannot write {p} ({exc.strerror or exc}); free disk space or pass "
                          "another --cache-dir") from None
    return p


# --- a multiworker run's shards, in a folder every task sees (--shard-store) -----------------------

def shard_path(folder, run: str, part: str, index: int, tasks: int) -> Path:
    """Where task ``index`` of ``tasks`` keeps its shard of ``part`` (train, test) for run ``run``.
    Only the final name counts: atomic_open writes beside it under another (``*.tmp``)."""
    return Path(folder) / f"run-{run}" / f"{part}-{index}-of-{tasks}.npz"


def save_shard(folder, run: str, part: str, index: int, tasks: int, positions: np.ndarray,
               rows: np.ndarray) -> Path:
    """Task ``index``'s rows of ``part`` and their positions in the split, written atomically: the
    file appears whole, at its name, or not at all (a task that dies mid-write leaves only a ``.tmp``)."""
    p = shard_path(folder, run, part, index, tasks)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(p, "wb") as f:
            np.savez(f, positions=np.asarray(positions, np.int64), rows=rows, index=np.asarray(index),
                     tasks=np.asarray(tasks))
    except OSError as exc:
        raise OutputError(f"--shard-store {folder}: cannot write {p} ({exc.strerror or exc}); free disk space or "
                          "pass another folder that every task sees") from None
    return p


def _read_shard(p: Path, index: int, tasks: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(p, allow_pickle=False) as stored:
            if int(stored["index"]) != index or int(stored["tasks"]) != tasks:
                return None
            return stored["positions"], stored["rows"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # not there yet (or not visible yet on a network filesystem), or not whole


def load_shards(folder, run: str, part: str, tasks: int, timeout: float,
                poll: float = 0.2) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every task's shard of ``part``, in task order, each (positions, rows). A shard counts only
    when its file reads whole under its final name; waits up to ``timeout`` seconds for all of
    them (every task has written its own before the tasks meet, so this only waits for the
    filesystem to show them), then a one-line ClusterError naming the shards still missing."""
    end = time.monotonic() + timeout
    got: dict[int, tuple] = {}
    while True:
        for i in range(tasks):
            if i not in got:
                shard = _read_shard(shard_path(folder, run, part, i, tasks), i, tasks)
                if shard is not None:
                    got[i] = shard
        if len(got) == tasks:
            return [got[i] for i in range(tasks)]
        if time.monotonic() >= end:
            missing = ", ".join(str(i) for i in range(tasks) if i not in got)
            raise ClusterError(f"--shard-store {folder}: the {part} shard of task {missing} is not complete in "
                               f"{shard_path(folder, run, part, 0, tasks).parent} after {timeout:g} s "
                               "(--peer-timeout); does every task see the same folder?")
        time.sleep(poll)


def remove_run(folder, run: str) -> None:
    """The run's shards, once every task has read them."""
    shutil.rmtree(Path(folder) / f"run-{run}", ignore_errors=True)
