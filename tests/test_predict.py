"""``python -m flowers_fast predict`` with the offline random classifier, and the figures."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from flowers_fast.cli import main
from flowers_fast.errors import DataError
from flowers_fast.synthetic import CLASSES, render


@pytest.fixture(scope="module")
def classifier(cache):
    """The random Hub-format classifier at 224 px, exported where ``--model-handle random`` looks
    (16 calibration images instead of 64: same interface, faster)."""
    from flowers_fast import hubexport

    return hubexport.export_random_classifier(hubexport.classifier_path(cache), seed=0, image_size=224,
                                              calibration=16)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict_images")
    paths = []
    for label in range(2):
        path = folder / f"{CLASSES[label]}.jpg"
        assert cv2.imwrite(str(path), cv2.cvtColor(render(label, np.random.default_rng(label)), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def parse(out: str) -> dict[str, list[tuple[float, str]]]:
    """{image path: [(probability, label), ...]} from predict's output."""
    result, current = {}, None
    for line in out.splitlines():
        if line.startswith("  ") and current is not None:
            prob, label = line.strip().split(maxsplit=1)
            result[current].append((float(prob), label))
        elif not line.startswith("predict:"):
            current = line.strip()
            result[current] = []
    return result


def test_predict_top5_imagenet_labels(classifier, images, capsys):
    from flowers_fast.predict import imagenet_labels

    assert main(["predict", *map(str, images), "--model-handle", str(classifier)]) == 0
    out = capsys.readouterr().out
    assert "weights random" in out
    results = parse(out)
    assert list(results) == [str(p) for p in images]
    labels = set(imagenet_labels())
    assert len(imagenet_labels()) == 1001
    for rows in results.values():
        assert len(rows) == 5
        probs = [p for p, _ in rows]
        assert all(label in labels for _, label in rows)
        assert probs == sorted(probs, reverse=True)
        assert all(0 < p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6


def test_random_handle_reuses_the_export(classifier, images, capsys):
    assert main(["predict", str(images[0]), "--model-handle", "random", "--top", "3"]) == 0
    captured = capsys.readouterr()
    assert "exporting" not in captured.err
    assert str(classifier) in captured.out
    assert [len(rows) for rows in parse(captured.out).values()] == [3]


def test_missing_image_is_one_line_data_error(tmp_path, capsys):
    missing = tmp_path / "no_such.jpg"
    assert main(["predict", str(missing), "--model-handle", "random"]) == DataError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such.jpg" in err[0] and "no such image file" in err[0]


def test_undecodable_image_is_data_error(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    assert main(["predict", str(bad), "--model-handle", "random"]) == DataError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jpg" in err[0] and "cannot be decoded" in err[0]


def test_checkpoint_with_class_names(images, tmp_path, capsys):
    """A small stand-in for a `train --save` model: uint8 input, 3 classes, classes.txt inside."""
    from flowers_fast.tfkeras import keras, tf

    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="scale")(tf.cast(inputs, tf.float32))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    path = tmp_path / "ckpt"
    model.save(str(path))
    (path / "classes.txt").write_text("alpha\nbeta\ngamma\n")
    assert main(["predict", str(images[0]), "--checkpoint", str(path)]) == 0
    rows = parse(capsys.readouterr().out)[str(images[0])]
    assert sorted(label for _, label in rows) == ["alpha", "beta", "gamma"]  # --top 5 capped at 3 classes
    assert sum(p for p, _ in rows) == pytest.approx(1.0, abs=1e-3)


def test_confusion_matrix_and_prediction_grid(images, tmp_path):
    from flowers_fast import figures

    classes = list(CLASSES)
    y_true = [0, 0, 1, 1, 2, 4]
    y_pred = [0, 1, 1, 1, 2, 3]
    csv_path, png_path = figures.confusion_matrix(y_true, y_pred, classes, tmp_path / "fig", "tfdata-cpu-r0")
    table = pd.read_csv(csv_path, index_col=0)
    assert list(table.index) == classes and list(table.columns) == classes  # every class, even unseen
    assert table.loc["daisy", "daisy"] == 1 and table.loc["daisy", "dandelion"] == 1
    assert table.loc["tulips", "sunflowers"] == 1 and table.to_numpy().sum() == 6
    assert png_path.stat().st_size > 5000

    files = [images[0], images[1], images[0], tmp_path / "gone.jpg"]
    grid = figures.prediction_grid(files, [0, 1, 0, 2], [0, 0, 0, 2], classes, tmp_path / "fig" / "grid.png", n=16)
    assert grid.exists() and grid.stat().st_size > 5000


def test_figures_as_objects_for_a_notebook(images):
    """The figures the files hold, as matplotlib Figures (what the notebook shows inline)."""
    import numpy as np
    from matplotlib.figure import Figure

    from flowers_fast import figures

    classes = list(CLASSES)
    table = figures.confusion_table([0, 0, 1, 7], [0, 1, 1, 7], classes)
    assert list(table.index)[-1] == "class 7" and table.to_numpy().trace() == 3
    cm = figures.confusion_figure(table, "featcache")
    assert isinstance(cm, Figure) and "accuracy 75.0%" in cm.axes[0].get_title()
    grid = figures.prediction_figure([images[0], images[1]], [0, 1], [0, 0], classes, n=4)
    assert isinstance(grid, Figure) and "1 wrong" in grid._suptitle.get_text()
    samples = figures.sample_figure(np.zeros((3, 8, 8, 3)), [0, 1, 2], classes, title="BGR")
    assert [ax.get_title() for ax in samples.axes[:3]] == classes[:3]
