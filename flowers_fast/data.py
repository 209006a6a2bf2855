"""Where the images come from: discovery of a class-folder dataset, the three sources
(synthetic, flower_photos download, tensorflow-datasets), and the one split every pipeline uses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import synthetic
from .config import RunConfig
from .errors import DataError, OfflineError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}


@dataclass(frozen=True)
class ImageFolder:
    """A discovered dataset: sorted class names, sorted files, their labels."""

    root: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    kind: str  # synthetic | flowers | tfds | folder
    ignored: tuple[str, ...] = field(default=())  # non-image files seen and left out

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class Split:
    train_idx: tuple[int, ...]  # positions in the dataset's sorted file list
    test_idx: tuple[int, ...]
    train_files: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_files: tuple[str, ...]
    test_labels: tuple[int, ...]


def discover(root: str | Path, kind: str = "folder") -> ImageFolder:
    """Find ``root/<class>/<image>``: classes and files sorted by name, non-images ignored."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"--data-dir {root}: does not exist; pass a folder with one subfolder of images per class")
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: is not a directory; pass a folder with one subfolder of images per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    ignored = [str(p) for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not class_dirs:
        raise DataError(f"--data-dir {root}: has no class subfolders; expected e.g. daisy/, roses/ with JPEGs inside")
    if len(class_dirs) < 2:
        raise DataError(f"--data-dir {root}: has only one class folder ({class_dirs[0].name}); at least 2 are needed")
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = []
        for p in sorted(class_dir.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(str(p))
            else:
                ignored.append(str(p))
        if not found:
            raise DataError(f"--data-dir {root}: class folder {class_dir.name}/ has no images; "
                            "remove it or add images (.jpg, .jpeg, .png)")
        files += found
        labels += [label] * len(found)
    return ImageFolder(str(root), tuple(p.name for p in class_dirs), tuple(files), tuple(labels), kind,
                       tuple(sorted(ignored)))


def split(dataset: ImageFolder, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The one train/test split: a seeded permutation of the sorted file list.

    Same arithmetic as sklearn's ``train_test_split(test_size=f, random_state=seed)``
    (the notebook's call), so a given file list splits the same everywhere.
    """
    n = len(dataset.files)
    n_test = math.ceil(test_fraction * n)
    if n_test < 1 or n - n_test < 1:
        raise DataError(f"dataset at {dataset.root} has {n} images: too few to split into train and test")
    perm = np.random.RandomState(seed).permutation(n)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    files, labels = np.asarray(dataset.files), np.asarray(dataset.labels)
    return Split(tuple(int(i) for i in train_idx), tuple(int(i) for i in test_idx), tuple(files[train_idx]), tuple(int(x) for x in labels[train_idx]),
                 tuple(files[test_idx]), tuple(int(x) for x in labels[test_idx]))


def resolve(cfg: RunConfig, cache: Path) -> ImageFolder:
    """The dataset a configuration asks for, fetched or generated into ``cache`` when needed."""
    if cfg.data_dir:
        return discover(cfg.data_dir, kind="flowers" if cfg.dataset == "flowers" else "folder")
    if cfg.dataset == "synthetic":
        root = synthetic.generate(synthetic.default_root(cache, cfg.num_images, cfg.seed), cfg.num_images, cfg.seed)
        return discover(root, kind="synthetic")
    if cfg.dataset == "flowers":
        from .download import fetch_flowers

        return discover(fetch_flowers(cache), kind="flowers")
    return discover(_tfds_folder(cache), kind="tfds")


def _tfds_folder(cache: Path) -> Path:
    """tf_flowers from tensorflow-datasets, written out once as class folders of its JPEG bytes,
    so every pipeline reads files the same way."""
    root = Path(cache) / "tfds_flowers"
    if (root / ".complete").exists():
        return root
    import os
    import shutil
    import socket
    import tempfile

    import tensorflow_datasets as tfds

    offline = ("--dataset tfds: cannot reach download.tensorflow.org; offline, use --data-dir PATH with a local "
               "flower_photos folder or --dataset synthetic")
    if not (Path(cache) / "tfds" / "tf_flowers").exists():
        try:  # tfds retries for minutes when offline; ask once, quickly
            socket.create_connection(("download.tensorflow.org", 443), timeout=5).close()
        except OSError:
            raise OfflineError(offline) from None
    try:
        ds, info = tfds.load("tf_flowers", split="train", with_info=True, data_dir=str(Path(cache) / "tfds"),
                             decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as exc:  # tfds raises many kinds when offline
        raise OfflineError(f"--dataset tfds: could not load tf_flowers ({type(exc).__name__}); offline, use "
                           "--data-dir PATH with a local flower_photos folder or --dataset synthetic") from None
    names = info.features["label"].names
    tmp = Path(tempfile.mkdtemp(prefix="tfds_flowers.", dir=cache))
    try:
        for name in names:
            (tmp / name).mkdir()
        for i, ex in enumerate(tfds.as_numpy(ds)):
            (tmp / names[ex["label"]] / f"{i:05d}.jpg").write_bytes(ex["image"])
        (tmp / ".complete").write_text("ok\n")
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
