"""``python -m flowers_fast`` (installed as ``flowers-fast``): train one configuration, predict,
export the offline model. The train flags are generated from RunConfig's knob declarations."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from .clikit import OneLineParser, add_config_flag, add_knob_flags, given_knobs, knob_type, run_main
from .config import TRAIN, RunConfig, from_file
from .errors import OutputError, UserError, invoked
from .outputs import OVERWRITE_HELP, Outputs, atomic_write, temp_dir


def cache_path(args) -> Path:
    from .download import cache_dir

    return cache_dir(getattr(args, "cache_dir", None))


def add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="PATH",
                        help="downloads, generated data and exported models (env FLOWERS_FAST_CACHE; "
                             "default ~/.cache/flowers_fast)")


def write_folder(path: Path, flag: str, write) -> None:
    """``write(tmp)`` fills a temporary folder beside ``path``, which then becomes ``path`` in one
    rename: a failed or killed write leaves nothing half-written at ``path``."""
    try:
        tmp = temp_dir(path.parent, f".{path.name}.")
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write ({exc.strerror or exc}); pass a folder you can write to") \
            from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write ({exc.strerror or exc}); free disk space or pass another "
                          "folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_table(row: dict) -> None:
    keys = ["pipeline", "device", "dataset", "weights", "compute_dtype", "mixed_route", "engine", "onednn_enabled",
            "train_images", "test_images", "skipped_files", "data_prep_s", "engine_setup_s", "quantize_s",
            "quantized_reused", "feature_cosine_vs_fp32", "feature_cosine_on", "feature_pass_s",
            "feature_pass_img_s", "features_reused", "first_epoch_s", "steady_epoch_s", "train_img_s", "total_s",
            "test_accuracy", "test_loss", "peak_rss_mb"]
    keys = [k for k in keys if k in row and row[k] != ""]
    width = max(len(k) for k in keys)
    for k in keys:
        v = row.get(k, "")
        print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def train_config(args) -> RunConfig:
    """The configuration ``train`` runs: ``--config FILE`` (if given) with the flags given on top."""
    given = given_knobs(args, TRAIN)
    return from_file(args.config, given) if args.config else RunConfig.from_flags(**given)


def cmd_train(args) -> int:
    cfg = train_config(args)
    if cfg.pipeline == "modelonly" and (args.save or args.figures):
        raise UserError(f"--{'save' if args.save else 'figures'} needs a pipeline that trains on images; "
                        "--pipeline modelonly only times train steps on random tensors")
    # Every output is checked before the (long) training starts; folders made for them go again
    # if the run fails.
    with Outputs(args.overwrite) as outputs:
        return _train(args, cfg, outputs)


def _train(args, cfg: RunConfig, outputs: Outputs) -> int:
    cache = cache_path(args)
    save = outputs.new_folder(args.save, "--save") if args.save else None
    fig_dir = Path(args.figures).expanduser() if args.figures else None
    if fig_dir:
        if save and fig_dir.resolve() == save.resolve():
            raise UserError("--figures and --save name the same folder; --save needs a folder of its own")
        outputs.folder(fig_dir, "--figures")
        from .figures import figure_names

        for name in figure_names(cfg.pipeline):
            outputs.file(fig_dir / name, "--figures", fix="pass another folder")
    json_path = outputs.file(args.json, "--json") if args.json else None
    if cfg.profile:
        outputs.folder(Path(cfg.profile).expanduser(), "--profile")
    from . import runtime

    runtime.setup(cfg)
    from . import cluster, figures, train

    result = train.run(cfg, cache, progress=not args.quiet, keep_model=bool(save))
    member = cluster.current() if cfg.strategy == "multiworker" else None
    helper = member is not None and not member.is_chief  # in a cluster, the chief alone writes the model
    row = {**cfg.to_dict(), **result.row}
    model = train.image_model(result, cfg) if save else None
    if json_path:
        try:
            atomic_write(json_path, json.dumps(row, default=str))
        except OSError as exc:
            raise OutputError(f"--json {json_path}: cannot write ({exc.strerror or exc}); free disk space or pass "
                              "another file") from None
    print(f"{invoked('flowers_fast')} train: {cfg.pipeline} on {cfg.device} ({runtime.device_name(cfg.device)}), "
          f"data {row['dataset']}, weights {row['weights']}; times in seconds, throughput in images/s")
    _print_table(row)
    if row.get("profile_trace"):
        print(f"profile: {row['profile_trace']} (outside the timed epochs; view: tensorboard --logdir {cfg.profile})")
    # The metrics are on screen; the model goes to disk before the figures, so that a figure that
    # cannot be written does not cost the trained model.
    if save and helper:
        # Every task must take part in saving (MWMS reads variables collectively); only the chief keeps it.
        with tempfile.TemporaryDirectory(prefix="flowers_fast_save_") as scratch, cluster.one_line_failures(True):
            model.save(scratch)
        print(f"{member.label}: the chief saves the model and writes figures; this task's copy was discarded")
    elif save:
        from .tfkeras import tf

        def write(tmp: Path) -> None:
            try:
                with cluster.one_line_failures(member is not None):
                    model.save(str(tmp))
            except tf.errors.OpError as exc:  # TensorFlow's own type for a full disk
                raise OSError(exc.message.strip().splitlines()[0][:160]) from None
            # predict --checkpoint reads these: class names, and how the model was fed (BGR or RGB).
            (tmp / "classes.txt").write_text("\n".join(result.classes) + "\n")
            # The configuration, with the image count the data really had (--num-images sizes synthetic sets only).
            (tmp / "run.json").write_text(json.dumps({**cfg.to_dict(), "num_images": row["num_images"]},
                                                     sort_keys=True))

        write_folder(save, "--save", write)
        what = "the frozen backbone with the trained head" if cfg.pipeline == "featcache" else "the whole model"
        print(f"saved model to {save} ({what}: images -> {len(result.classes)} classes, for predict --checkpoint)")
    written = figures.run_figures(result, fig_dir, cfg.pipeline) if fig_dir and not helper else []
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    with Outputs() as outputs:
        out = outputs.new_folder(args.out, "export-model")
        from .hubexport import export_random_mobilenet

        path = export_random_mobilenet(out, seed=args.seed, image_size=args.image_size)
    print(f"exported a randomly initialised MobileNetV2 (Hub feature_vector format) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import predict

    parser = OneLineParser(prog=invoked("flowers_fast"),
                           description="MobileNetV2 transfer learning on flowers, the naive way or fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train and evaluate one configuration")
    add_config_flag(p)
    add_knob_flags(p, TRAIN)
    g = p.add_argument_group("output")
    add_cache_flag(g)
    g.add_argument("--save", metavar="PATH", help="save the trained model (SavedModel) for predict --checkpoint")
    g.add_argument("--figures", metavar="DIR", help="write a confusion matrix (CSV, PNG) and a grid of test "
                                                    "images with true and predicted labels")
    g.add_argument("--json", metavar="PATH", help="also write the result row (every CSV column) to PATH as JSON")
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + " (--json, the --figures files; a "
                                                                              "--save folder is never replaced)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export-model", help="write the offline random MobileNetV2 in TF Hub format")
    p.add_argument("out", help="folder to write the SavedModel to")
    p.add_argument("--seed", type=knob_type("seed"), default=0, help="weights seed (default 0)")
    p.add_argument("--image-size", type=knob_type("image_size"), default=224,
                   help="input size in pixels (default 224)")
    p.set_defaults(func=cmd_export)

    predict.add_parser(sub)
    return parser


def main(argv=None) -> int:
    return run_main(build_parser(), argv)
