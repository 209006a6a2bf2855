"""The notebook's whole story from the command line: train, pictures, save, predict."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_figures_save_then_predict_flower_classes(tmp_path, small_model, cache):
    env = {**os.environ, "FLOWERS_FAST_CACHE": str(cache)}
    train = subprocess.run(
        [sys.executable, "-m", "flowers_fast", "train", "--pipeline", "tfdata", "--num-images", "60", "--image-size",
         "96", "--epochs", "2", "--model-handle", str(small_model), "--quiet", "--figures", str(tmp_path / "fig"),
         "--save", str(tmp_path / "model")], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert train.returncode == 0, train.stderr[-2000:]
    for name in ("tfdata-confusion.csv", "tfdata-confusion.png", "tfdata-predictions.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 100, name
    assert (tmp_path / "model" / "classes.txt").read_text().split() == ["daisy", "dandelion", "roses", "sunflowers",
                                                                        "tulips"]
    image = next((cache / "synthetic").glob("flowers-n60-*/roses/*.jpg"))
    pred = subprocess.run([sys.executable, "-m", "flowers_fast", "predict", str(image), "--checkpoint",
                           str(tmp_path / "model")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert pred.returncode == 0, pred.stderr[-2000:]
    classes = {"daisy", "dandelion", "roses", "sunflowers", "tulips"}
    assert sum(1 for line in pred.stdout.splitlines() if any(c in line for c in classes)) >= 5
