"""``python -m bench``: run, list, report, recommend, dataservice (one module per command)."""

from __future__ import annotations

import argparse

from flowers_fast.argtypes import OneLineParser, positive_int
from flowers_fast.cli import run_main
from flowers_fast.config import DATASETS, STRATEGIES

from . import configs


def cmd_run(args) -> int:
    from .run import execute

    return execute(args)


def cmd_list(args) -> int:
    print("configurations (python -m bench run --configs a,b):")
    for name, cfg in configs.CONFIGS.items():
        print(f"  {name:<18} {configs.describe(cfg)}")
    print("\npresets (--preset):")
    for name, preset in configs.PRESETS.items():
        print(f"  {name:<6} {preset.description}\n         configs: {', '.join(preset.configs)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m bench",
                            description="Compare ways to feed and compile the flowers transfer-learning job.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run configurations side by side and write a CSV under --out",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu", "all"), default="cpu")
    p.add_argument("--preset", choices=tuple(configs.PRESETS), default="quick")
    p.add_argument("--configs", metavar="NAME,...", help="configurations to run (default: the preset's); "
                                                         "see python -m bench list")
    p.add_argument("--dataset", choices=DATASETS, help="default: the preset's")
    p.add_argument("--data-dir", metavar="PATH", help="a local class-folder dataset (e.g. flower_photos)")
    p.add_argument("--model-handle", metavar="URL|PATH", help="Hub URL, 'hub', a local SavedModel, or 'random'")
    p.add_argument("--num-images", type=positive_int, help="synthetic set size (default: the preset's)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, help="per replica")
    p.add_argument("--repeats", type=positive_int, help="runs of each configuration (default: the preset's)")
    p.add_argument("--timeout", type=positive_int, metavar="S", help="per configuration (default: the preset's)")
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--logical-cpus", type=int, metavar="N", help="with --strategy mirrored on a CPU: N replicas")
    p.add_argument("--data-service", metavar="grpc://HOST:PORT")
    p.add_argument("--seed", type=int)
    p.add_argument("--figures", action="store_true", help="write confusion matrices and prediction grids")
    p.add_argument("--out", default="results", metavar="DIR")
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_CSV",
                   help="continue the newest (or the given) run: skip rows already there")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", help="list configurations and presets")
    p.set_defaults(func=cmd_list)

    for module in ("report", "recommend", "dataservice"):
        try:
            mod = __import__(f"bench.{module}", fromlist=["add_parser"])
        except ImportError:
            continue
        if hasattr(mod, "add_parser"):
            mod.add_parser(sub)
    return parser


def main(argv=None) -> int:
    return run_main(build_parser(), argv)
