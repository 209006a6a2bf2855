"""A deterministic, flowers-like synthetic dataset for offline runs.

Five classes named like flower_photos, JPEGs with the real set's size mix. Each class has
its own petal colour, petal count and shape, and centre, so a linear head on CNN features
can tell them apart, while position, scale, rotation, background and noise vary per image.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from .errors import OutputError
from .outputs import temp_dir

CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
# The real set's frames: mostly 320x240 .. 500x375, landscape and portrait.
SIZES = ((320, 240), (400, 300), (500, 375), (500, 333), (240, 320), (333, 500), (375, 500), (320, 320))
# Per class (RGB): petal hue, petal count, petal length/width ratio, centre colour, centre size.
STYLES = {
    "daisy": dict(petal=(245, 245, 240), petals=(14, 20), thin=4.0, centre=(235, 190, 30), centre_frac=0.25),
    "dandelion": dict(petal=(250, 215, 20), petals=(28, 40), thin=6.0, centre=(230, 180, 10), centre_frac=0.12),
    "roses": dict(petal=(200, 20, 50), petals=(5, 7), thin=1.3, centre=(140, 10, 30), centre_frac=0.35),
    "sunflowers": dict(petal=(255, 140, 0), petals=(16, 24), thin=2.5, centre=(90, 50, 15), centre_frac=0.5),
    "tulips": dict(petal=(160, 50, 210), petals=(3, 4), thin=1.6, centre=(60, 120, 40), centre_frac=0.08),
}
FORMAT_VERSION = 2


def _jitter(rng: np.random.Generator, colour, amount=30) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image of class ``label``."""
    width, height = SIZES[rng.integers(len(SIZES))]
    style = STYLES[CLASSES[label]]
    # Background: a green-brown vertical gradient with noise, like foliage and soil.
    top = np.array(_jitter(rng, (60, 120, 50), 25), np.float32)
    bottom = np.array(_jitter(rng, (100, 90, 50), 25), np.float32)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    img = (top * (1 - t) + bottom * t) * np.ones((1, width, 3), np.float32)
    img += rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(img)

    radius = int(min(width, height) * rng.uniform(0.32, 0.46))
    cx = int(width / 2 + rng.uniform(-0.15, 0.15) * width)
    cy = int(height / 2 + rng.uniform(-0.15, 0.15) * height)
    petals = int(rng.integers(style["petals"][0], style["petals"][1] + 1))
    length = radius * 0.55
    half_width = max(2, int(length / style["thin"]))
    rotation = rng.uniform(0, 360)
    for k in range(petals):
        angle = rotation + 360.0 * k / petals
        px = int(cx + math.cos(math.radians(angle)) * length)
        py = int(cy + math.sin(math.radians(angle)) * length)
        cv2.ellipse(img, (px, py), (int(length), half_width), angle, 0, 360,
                    _jitter(rng, style["petal"], 25), -1, lineType=cv2.LINE_AA)
    centre_r = max(2, int(radius * style["centre_frac"]))
    cv2.circle(img, (cx, cy), centre_r, _jitter(rng, style["centre"], 20), -1, lineType=cv2.LINE_AA)
    return img


def generate(root: Path, num_images: int, seed: int) -> Path:
    """Write the dataset as class folders of JPEGs under ``root``, atomically; returns root.

    Image i is a function of (seed, i) alone, so a set of n images is the first n of a larger one.
    """
    root = Path(root)
    if (root / ".complete").exists():
        return root
    try:
        return _generate(root, num_images, seed)
    except OSError as exc:  # a full disk or a read-only cache: nothing half-written is left behind
        raise OutputError(f"cannot write the synthetic set into {root.parent} ({exc.strerror or exc}); free disk "
                          "space, or use another cache folder (--cache-dir or FLOWERS_FAST_CACHE)") from None


def _generate(root: Path, num_images: int, seed: int) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root.parent, root.name + ".")
    try:
        for name in CLASSES:
            (tmp / name).mkdir()
        for i in range(num_images):
            rng = np.random.default_rng([seed, i])
            label = i % len(CLASSES)
            rgb = render(label, rng)
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            (tmp / CLASSES[label] / f"{i:05d}.jpg").write_bytes(buf.tobytes())
        (tmp / ".complete").write_text(f"{num_images} {seed} v{FORMAT_VERSION}\n")
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished first; theirs is identical.
            if not (root / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_root(cache: Path, num_images: int, seed: int) -> Path:
    return Path(cache) / "synthetic" / f"flowers-n{num_images}-seed{seed}-v{FORMAT_VERSION}"
