"""``python -m flowers_fast`` (installed as ``flowers-fast``): train one configuration, predict,
export the offline model. The train flags are generated from RunConfig's knob declarations."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .clikit import OneLineParser, add_knob_flags, given_knobs, positive_int, run_main
from .config import TRAIN, RunConfig
from .errors import OutputError, invoked


def cache_path(args) -> Path:
    from .download import cache_dir

    return cache_dir(getattr(args, "cache_dir", None))


def add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="PATH",
                        help="downloads, generated data and exported models (env FLOWERS_FAST_CACHE; "
                             "default ~/.cache/flowers_fast)")


def check_output_folder(path: Path, flag: str) -> None:
    """Fail in a second, not after training: ``path`` must be a folder we can create and write."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-").close()
    except OSError as exc:
        raise OutputError(f"{flag} {path}: not writable ({exc.strerror or exc}); pass a folder you can write to") \
            from None


def _print_table(row: dict) -> None:
    keys = ["pipeline", "device", "dataset", "weights", "compute_dtype", "train_images", "test_images",
            "skipped_files", "data_prep_s", "first_epoch_s", "steady_epoch_s", "train_img_s", "total_s",
            "test_accuracy", "test_loss", "peak_rss_mb"]
    width = max(len(k) for k in keys)
    for k in keys:
        v = row.get(k, "")
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def cmd_train(args) -> int:
    cfg = RunConfig.from_flags(**given_knobs(args, TRAIN))
    for path, flag in ((args.save, "--save"), (args.figures, "--figures"),
                       (args.json and Path(args.json).parent, "--json")):
        if path:
            check_output_folder(Path(path), flag)
    from . import runtime

    runtime.setup(cfg)
    from . import cluster, figures, train

    result = train.run(cfg, cache_path(args), progress=not args.quiet, keep_model=bool(args.save))
    member = cluster.current() if cfg.strategy == "multiworker" else None
    helper = member is not None and not member.is_chief  # in a cluster, the chief alone writes the model
    written = figures.run_figures(result, Path(args.figures), cfg.pipeline) if args.figures and not helper else []
    row = {**cfg.to_dict(), **result.row}
    if args.json:
        Path(args.json).write_text(json.dumps(row, default=str))
    print(f"{invoked('flowers_fast')} train: {cfg.pipeline} on {cfg.device} ({runtime.device_name(cfg.device)}), "
          f"data {row['dataset']}, weights {row['weights']}; times in seconds, throughput in images/s")
    _print_table(row)
    if args.save and helper:
        # Every task must take part in saving (MWMS reads variables collectively); only the chief keeps it.
        with tempfile.TemporaryDirectory(prefix="flowers_fast_save_") as scratch, cluster.one_line_failures(True):
            result.model.save(scratch)
        print(f"{member.label}: the chief saves the model and writes figures; this task's copy was discarded")
    elif args.save:
        with cluster.one_line_failures(member is not None):
            result.model.save(args.save)
        # predict --checkpoint reads these: class names, and how the model was fed (BGR or RGB).
        (Path(args.save) / "classes.txt").write_text("\n".join(result.classes) + "\n")
        (Path(args.save) / "run.json").write_text(cfg.to_json())
        print(f"saved model to {args.save}")
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    from .hubexport import export_random_mobilenet

    path = export_random_mobilenet(Path(args.out), seed=args.seed, image_size=args.image_size)
    print(f"exported a randomly initialised MobileNetV2 (Hub feature_vector format) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import predict

    parser = OneLineParser(prog=invoked("flowers_fast"),
                           description="MobileNetV2 transfer learning on flowers, the naive way or fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train and evaluate one configuration")
    add_knob_flags(p, TRAIN)
    g = p.add_argument_group("output")
    add_cache_flag(g)
    g.add_argument("--save", metavar="PATH", help="save the trained model (SavedModel) for predict --checkpoint")
    g.add_argument("--figures", metavar="DIR", help="write a confusion matrix (CSV, PNG) and a grid of test "
                                                    "images with true and predicted labels")
    g.add_argument("--json", metavar="PATH", help="also write the result row (every CSV column) to PATH as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export-model", help="write the offline random MobileNetV2 in TF Hub format")
    p.add_argument("out", help="folder to write the SavedModel to")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    p.add_argument("--image-size", type=positive_int, default=224, help="input size in pixels (default 224)")
    p.set_defaults(func=cmd_export)

    predict.add_parser(sub)
    return parser


def main(argv=None) -> int:
    return run_main(build_parser(), argv)
