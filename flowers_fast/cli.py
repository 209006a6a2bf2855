"""``python -m flowers_fast``: train (naive or tf.data), predict, export the offline model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import DATASETS, DEVICES, PIPELINES, PRECISIONS, RANDOM_HANDLE, STRATEGIES, RunConfig
from .argtypes import OneLineParser, positive_int
from .errors import INTERRUPTED_EXIT_CODE, UserError


def add_data_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that trains: data source, model, cache."""
    g = parser.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="synthetic (built-in, offline; default), flowers (flower_photos.tgz download or "
                        "--data-dir), tfds (tensorflow-datasets tf_flowers)")
    g.add_argument("--data-dir", metavar="PATH", help="a local class-folder dataset, e.g. an extracted flower_photos")
    g.add_argument("--num-images", type=positive_int, default=3670, help="synthetic set size (default 3670)")
    g.add_argument("--model-handle", default=RANDOM_HANDLE, metavar="URL|PATH",
                   help="TF Hub feature-vector URL ('hub' = mobilenet_v2/feature_vector/4), a local Hub "
                        "SavedModel folder, or 'random' (built-in offline MobileNetV2; default)")
    g.add_argument("--cache-dir", metavar="PATH",
                   help="downloads, generated data and exported models (env FLOWERS_FAST_CACHE; "
                        "default ~/.cache/flowers_fast)")
    g.add_argument("--image-size", type=positive_int, default=224, help="square input size (default 224)")
    g.add_argument("--seed", type=int, default=0, help="split, synthetic data and head initialisation seed")
    g.add_argument("--strict", action="store_true", help="undecodable images are an error instead of a counted skip")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=5)
    g.add_argument("--batch-size", type=positive_int, default=32, help="per replica")
    g.add_argument("--learning-rate", type=float, default=1e-3)
    g.add_argument("--fine-tune", action="store_true", help="train the backbone too (default: frozen)")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="mixed = float16 on GPU, bfloat16 on CPU, in the backbone's convolutions")
    g.add_argument("--xla", action="store_true", help="jit_compile the train step")
    g.add_argument("--xla-backbone", action="store_true", help="jit_compile the backbone forward (featcache)")
    g.add_argument("--rgb", action="store_true", help="naive pipeline: fix the notebook's BGR channel order")
    g.add_argument("--strategy", choices=STRATEGIES, default="default", help="tf.distribute strategy")
    g.add_argument("--logical-cpus", type=int, default=0, metavar="N",
                   help="split the CPU into N logical devices (with --strategy mirrored: N replicas on a CPU host)")
    g.add_argument("--data-service", metavar="grpc://HOST:PORT", help="tf.data service dispatcher for decoding")


def config_from_args(args, **overrides) -> RunConfig:
    dataset = args.dataset or ("flowers" if args.data_dir else "synthetic")
    values = dict(dataset=dataset, data_dir=args.data_dir, num_images=args.num_images,
                  model_handle=args.model_handle, image_size=args.image_size, seed=args.seed, strict=args.strict)
    for name, attr in (("epochs", "epochs"), ("batch_size", "batch_size"), ("learning_rate", "learning_rate"),
                       ("fine_tune", "fine_tune"), ("precision", "precision"), ("xla_step", "xla"),
                       ("xla_backbone", "xla_backbone"), ("naive_rgb", "rgb"), ("strategy", "strategy"),
                       ("data_service", "data_service"), ("pipeline", "pipeline"), ("device", "device"),
                       ("logical_cpus", "logical_cpus")):
        if getattr(args, attr, None) is not None:
            values[name] = getattr(args, attr)
    values.update(overrides)
    return RunConfig(**values)


def cache_path(args) -> Path:
    from .download import cache_dir

    return cache_dir(getattr(args, "cache_dir", None))


def _print_table(row: dict) -> None:
    keys = ["pipeline", "device", "dataset", "weights", "compute_dtype", "train_images", "test_images",
            "skipped_files", "data_prep_s", "first_epoch_s", "steady_epoch_s", "train_img_s", "total_s",
            "test_accuracy", "test_loss", "peak_rss_mb"]
    width = max(len(k) for k in keys)
    for k in keys:
        v = row.get(k, "")
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def cmd_train(args) -> int:
    cfg = config_from_args(args)
    from . import runtime

    runtime.setup(cfg)
    from . import train

    result = train.run(cfg, cache_path(args), progress=not args.quiet, keep_model=bool(args.save))
    written = _figures(result, Path(args.figures), cfg.pipeline) if args.figures else []
    row = {**cfg.to_dict(), **result.row}
    print(f"flowers_fast train: {cfg.pipeline} on {cfg.device} ({runtime.device_name(cfg.device)}), "
          f"data {row['dataset']}, weights {row['weights']}; times in seconds, throughput in images/s")
    _print_table(row)
    if args.save:
        result.model.save(args.save)
        # predict --checkpoint reads these: class names, and how the model was fed (BGR or RGB).
        (Path(args.save) / "classes.txt").write_text("\n".join(result.classes) + "\n")
        (Path(args.save) / "run.json").write_text(cfg.to_json())
        print(f"saved model to {args.save}")
    for path in written:
        print(f"wrote {path}")
    return 0


def _figures(result, folder: Path, stem: str) -> list[Path]:
    """The notebook's pictures, with real files: confusion matrix (CSV, PNG) and test predictions."""
    from . import figures

    folder.mkdir(parents=True, exist_ok=True)
    written = list(figures.confusion_matrix(result.y_true, result.y_pred, result.classes, folder, stem))
    if result.test_files:
        grid = folder / f"{stem}-predictions.png"
        figures.prediction_grid(result.test_files, result.y_true, result.y_pred, result.classes, grid)
        written.append(grid)
    return written


def cmd_export(args) -> int:
    from .hubexport import export_random_mobilenet

    path = export_random_mobilenet(Path(args.out), seed=args.seed, image_size=args.image_size)
    print(f"exported a randomly initialised MobileNetV2 (Hub feature_vector format) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m flowers_fast",
                            description="MobileNetV2 transfer learning on flowers, the naive way or fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train and evaluate one configuration")
    p.add_argument("--pipeline", choices=PIPELINES, default="tfdata",
                   help="naive (the notebook: OpenCV to NumPy), tutorial, tfdata, featcache")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    add_data_model_args(p)
    add_train_args(p)
    p.add_argument("--save", metavar="PATH", help="save the trained model (SavedModel) for predict --checkpoint")
    p.add_argument("--figures", metavar="DIR", help="write a confusion matrix (CSV, PNG) and a grid of test "
                                                    "images with true and predicted labels")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export-model", help="write the offline random MobileNetV2 in TF Hub format")
    p.add_argument("out", help="folder to write the SavedModel to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=positive_int, default=224)
    p.set_defaults(func=cmd_export)

    try:
        from .predict import add_parser as add_predict
    except ImportError:
        pass
    else:
        add_predict(sub)
    return parser


def run_main(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse, run, and turn user mistakes into one line and a distinct exit code."""
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def main(argv=None) -> int:
    return run_main(build_parser(), argv)
