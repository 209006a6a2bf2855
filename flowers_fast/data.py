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
from .outputs import temp_dir

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
EXIF_ORIENTATION = 0x0112  # the EXIF tag cameras and phones set instead of rotating the pixels


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


def discover(root: str | Path, kind: str = "folder", cached: bool = False) -> ImageFolder:
    """Find ``root/<class>/<image>``: classes and files sorted by name, non-images ignored.

    ``cached``: ``root`` is a dataset this package built in its cache (synthetic, download, tfds),
    so a problem is named as that folder, not as a --data-dir the user never gave."""
    root = Path(root).expanduser()
    where = f"cached dataset {root}" if cached else f"--data-dir {root}"
    fix = "; delete that folder and rerun to rebuild it" if cached else ""

    def bad(why: str, advice: str) -> DataError:
        return DataError(f"{where}: {why}{fix or '; ' + advice}")

    if not root.exists():
        raise bad("does not exist", "pass a folder with one subfolder of images per class")
    if not root.is_dir():
        raise bad("is not a directory", "pass a folder with one subfolder of images per class")
    try:
        entries = sorted(root.iterdir())
        class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        ignored = [str(p) for p in entries if p.is_file() and not p.name.startswith(".")]
        if not class_dirs:
            if any(Path(p).suffix.lower() in IMAGE_EXTENSIONS for p in ignored):  # one level too deep
                raise bad("holds images but no class subfolders",
                          f"pass the folder above it, whose subfolders are the classes ({root.parent})")
            raise bad("has no class subfolders", "expected e.g. daisy/, roses/ with JPEGs inside")
        if len(class_dirs) < 2:
            inner = class_dirs[0]
            if sum(1 for p in inner.iterdir() if p.is_dir() and not p.name.startswith(".")) >= 2:  # one level up
                raise bad(f"has only one subfolder ({inner.name}), which itself holds class folders",
                          f"pass --data-dir {inner}")
            raise bad(f"has only one class folder ({inner.name})", "at least 2 are needed")
        files, labels = [], []
        for label, class_dir in enumerate(class_dirs):
            found = []
            for p in sorted(class_dir.iterdir()):
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(str(p))
                else:
                    ignored.append(str(p))
            if not found:
                raise bad(f"class folder {class_dir.name}/ has no images",
                          f"remove it or add images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
            labels += [label] * len(found)
    except OSError as exc:  # an unreadable folder (permissions, a network share gone)
        raise bad(f"cannot read {exc.filename or root} ({exc.strerror or exc})", "check its permissions") from None
    return ImageFolder(str(root), tuple(p.name for p in class_dirs), tuple(files), tuple(labels), kind,
                       tuple(sorted(ignored)))


def fingerprint(dataset: ImageFolder) -> str:
    """12 hex digits of the dataset's file list (class folders and names, relative to its root, as
    bytes: any name the OS accepts): two rows with the same fingerprint read the same files.
    Contents are not read, so it costs nothing; a file replaced under the same name keeps it."""
    import hashlib
    import os

    digest = hashlib.sha256()
    for path in dataset.files:
        digest.update(os.fsencode(os.path.relpath(path, dataset.root)) + b"\0")
    return digest.hexdigest()[:12]


def exif_orientations(files) -> list[int]:
    """Each file's EXIF orientation, 1..8 (1: the pixels are stored upright), read from its header.

    ``cv2.imread`` (the naive pipeline) turns images upright by this tag, so tf.data does too
    (``pipeline.orient``); files without it, or that Pillow cannot open, count as 1."""
    import warnings

    from PIL import Image

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's decompression-bomb warning: only the header is read
        for path in files:
            try:
                with Image.open(path) as image:
                    # A PNG's eXIf chunk comes before its pixels; without one, getexif would decode them all.
                    unmarked = image.format == "PNG" and "exif" not in image.info
                    value = 1 if unmarked else image.getexif().get(EXIF_ORIENTATION, 1)
            except Exception:  # not an image Pillow knows, or a damaged header: the decoder decides
                value = 1
            out.append(value if isinstance(value, int) and 1 <= value <= 8 else 1)
    return out


def split(dataset: ImageFolder, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The one train/test split: a seeded permutation of the sorted file list.

    Same arithmetic as sklearn's ``train_test_split(test_size=f, random_state=seed)``
    (the notebook's call), so a given file list splits the same everywhere.
    """
    n = len(dataset.files)
    n_test = math.ceil(test_fraction * n)
    if n_test < 1 or n - n_test < 1:
        raise DataError(f"{dataset.root}: {n} images leave {n - n_test} for training and {n_test} for testing with "
                        f"--test-fraction {test_fraction:g}; add images or choose a --test-fraction that leaves "
                        "at least one of each")
    perm = np.random.RandomState(seed).permutation(n)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    files, labels = np.asarray(dataset.files), np.asarray(dataset.labels)
    return Split(tuple(int(i) for i in train_idx), tuple(int(i) for i in test_idx), tuple(files[train_idx]), tuple(int(x) for x in labels[train_idx]),
                 tuple(files[test_idx]), tuple(int(x) for x in labels[test_idx]))


def no_images_left(part: str, undecodable) -> DataError:
    """The error when no image of the split's ``part`` (train or test) can be decoded."""
    n, first = len(undecodable), undecodable[0]
    if n == 1:
        return DataError(f"{first}: cannot be decoded as an image and is the only {part} image of the split: nothing "
                         f"is left to {part} on; replace it, or add images")
    return DataError(f"{first}: cannot be decoded as an image, and neither can the other {n - 1} {part} images of "
                     f"the split: nothing is left to {part} on; replace or remove them, or add images")


def resolve(cfg: RunConfig, cache: Path) -> ImageFolder:
    """The dataset a configuration asks for, fetched or generated into ``cache`` when needed."""
    if cfg.data_dir:
        return discover(cfg.data_dir, kind="flowers" if cfg.dataset == "flowers" else "folder")
    if cfg.dataset == "synthetic":
        root = synthetic.generate(synthetic.default_root(cache, cfg.num_images, cfg.seed), cfg.num_images, cfg.seed)
        found = discover(root, kind="synthetic", cached=True)
        if len(found) != cfg.num_images or len(found.classes) != len(synthetic.CLASSES):  # files lost since
            raise DataError(f"cached dataset {root}: {len(found)} images in {len(found.classes)} classes, not "
                            f"{cfg.num_images} in {len(synthetic.CLASSES)}; delete that folder and rerun to "
                            "rebuild it")
        return found
    if cfg.dataset == "flowers":
        from .download import fetch_flowers

        return discover(fetch_flowers(cache), kind="flowers", cached=True)
    return discover(_tfds_folder(cache), kind="tfds", cached=True)


def _tfds_folder(cache: Path) -> Path:
    """tf_flowers from tensorflow-datasets, written out once as class folders of its JPEG bytes,
    so every pipeline reads files the same way."""
    root = Path(cache) / "tfds_flowers"
    if (root / ".complete").exists():
        return root
    import os
    import shutil
    import socket

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
    tmp = temp_dir(cache, "tfds_flowers.")
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
