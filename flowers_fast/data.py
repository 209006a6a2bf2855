"""Where the images come from: discovery of a class-folder dataset, the three sources
(synthetic, flower_photos download, tensorflow-datasets), and the one split every pipeline uses."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import synthetic
from .config import RunConfig
from .errors import DataError, OfflineError, one_line, printable
from .outputs import temp_dir

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
EXIF_ORIENTATION = 0x0112  # the EXIF tag cameras and phones set instead of rotating the pixels


@dataclass(frozen=True)
class ImageFolder:
    """A discovered dataset: sorted class names (printable: a folder name that is not UTF-8 shows
    its bytes escaped), sorted files, their labels."""

    root: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    kind: str  # synthetic | flowers | tfds | folder
    # Every file seen and not read: non-images, and whatever lies in subfolders of class folders.
    ignored: tuple[str, ...] = field(default=())

    @property
    def ignored_images(self) -> int:
        """Images left out (beside the class folders, or in their subfolders)."""
        return sum(is_image_name(p) for p in self.ignored)

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
            found, deeper = [], []
            for p in sorted(class_dir.iterdir()):
                if p.name.startswith("."):  # .DS_Store, ._x.jpg, .git: not data
                    continue
                if p.is_dir():  # not read (a class is one flat folder), but counted and said
                    deeper += _files_under(p)
                elif p.is_file() and is_image_name(p):
                    found.append(str(p))
                else:
                    ignored.append(str(p))
            ignored += deeper
            if not found:
                nested = [p for p in deeper if is_image_name(p)]
                if nested:
                    raise bad(f"class folder {class_dir.name}/ has no images of its own, only {len(nested)} in "
                              f"subfolders (e.g. {nested[0]})", f"move them up into {class_dir}/")
                raise bad(f"class folder {class_dir.name}/ has no images",
                          f"remove it or add images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
            labels += [label] * len(found)
    except OSError as exc:  # an unreadable folder (permissions, a network share gone)
        raise bad(f"cannot read {exc.filename or root} ({exc.strerror or exc})", "check its permissions") from None
    return ImageFolder(str(root), tuple(printable(p.name) for p in class_dirs), tuple(files), tuple(labels), kind,
                       tuple(sorted(ignored)))


def fingerprint(dataset: ImageFolder) -> str:
    """12 hex digits of the dataset's file list (class folders and names, relative to its root, as
    bytes: any name the OS accepts): two rows with the same fingerprint read the same files.
    Contents are not read, so it costs nothing; a file replaced under the same name keeps it."""
    import hashlib

    digest = hashlib.sha256()
    for path in dataset.files:
        digest.update(os.fsencode(os.path.relpath(path, dataset.root)) + b"\0")
    return digest.hexdigest()[:12]


def is_image_name(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` at any depth, hidden ones left out (symlinked folders not
    followed: no loops); an unreadable folder raises, as at the top level."""
    def fail(exc):
        raise exc

    out = []
    for where, dirs, names in os.walk(folder, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(where, n) for n in sorted(names) if not n.startswith(".")]
    return out


def warn(lines, more: str = "", limit: int = 5) -> None:
    """Each of ``lines`` on stderr as a warning, up to ``limit``; beyond that one summary line
    (``more``, formatted with the count left unsaid)."""
    lines = list(lines)
    for line in lines[:limit]:
        print(f"warning: {one_line(line)}", file=sys.stderr, flush=True)
    if len(lines) > limit:
        print(f"warning: {one_line(more.format(len(lines) - limit))}", file=sys.stderr, flush=True)


def left_out(dataset: ImageFolder) -> list[str]:
    """What discovery left out, one line per folder: images beside the class folders or in their
    subfolders, files in class folders that are not images by their extension. (Other files
    beside the class folders, like flower_photos' LICENSE.txt, are expected and not mentioned.)"""
    root, groups = Path(dataset.root), {}
    for path in dataset.ignored:
        parts = Path(path).relative_to(root).parts
        if len(parts) > 1:
            where = Path(*parts[:2]) if len(parts) > 2 else Path(parts[0])
            groups.setdefault((where, len(parts) > 2), []).append(Path(path))
    loose = sum(is_image_name(p) for p in dataset.ignored if Path(p).parent == root)
    lines = [f"{root}/: {loose} images beside the class folders are not read; move each into its class folder"] \
        if loose else []
    for (where, nested), paths in sorted(groups.items()):
        images = sum(is_image_name(p) for p in paths)
        if nested and images:
            lines.append(f"{root / where}/: {images} images in subfolders are not read; move them up into "
                         f"{root / where.parts[0]}/")
        elif not nested:
            kinds = ", ".join(sorted({p.suffix.lower() or "no extension" for p in paths}))
            lines.append(f"{root / where}/: {len(paths)} files that are not images by their extension ({kinds}) "
                         f"are not read; images must end in {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return lines


def gone(files) -> list[str]:
    """Those of ``files`` that no longer exist."""
    return [f for f in files if not os.path.exists(f)]


def gone_error(missing) -> DataError:
    """The error when images disappeared after discovery, e.g. deleted while the run trained."""
    others = f" (nor do {len(missing) - 1} other images)" if len(missing) > 1 else ""
    return DataError(f"{missing[0]}: no longer exists{others}: deleted or moved while the run was using the data "
                     "folder; keep it unchanged until the run ends, then run again")


def check_kept(dataset: ImageFolder, skipped) -> None:
    """After a pipeline decoded the split (``skipped``: the files it could not decode): a class
    left without images is a DataError (``check_classes``); each skipped file is said on stderr."""
    skipped = list(skipped)
    check_classes(dataset, skipped)
    warn((f"{f}: cannot be decoded as an image; skipped" for f in skipped),
         "... and {} more files that cannot be decoded were skipped (the row's skipped_list names them all)")


def check_classes(dataset: ImageFolder, undecodable) -> None:
    """A DataError naming the first class folder none of whose images decode: the model would
    silently know one class fewer."""
    lost = set(undecodable)
    for label, name in enumerate(dataset.classes):
        own = [f for f, y in zip(dataset.files, dataset.labels) if y == label]
        if own and all(f in lost for f in own):
            raise DataError(f"{Path(own[0]).parent}/: none of its {len(own)} images can be decoded (e.g. {own[0]}), "
                            f"so class {name} would be left out of the model; replace them, or remove the folder")


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
