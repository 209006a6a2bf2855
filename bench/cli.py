"""``python -m bench`` (installed as ``flowers-bench``): run, list, report, compare, recommend,
dataservice, one module per command. The sweep-wide flags of ``run`` are generated from
RunConfig's knob declarations."""

from __future__ import annotations

import argparse

from flowers_fast.clikit import OneLineParser, add_knob_flags, positive_int, run_main
from flowers_fast.config import SWEEP
from flowers_fast.errors import invoked

from . import compare, configs, dataservice, loopback, recommend, report
from .run import DEFAULTS


def cmd_run(args) -> int:
    from .run import execute

    return execute(args)


def cmd_list(args) -> int:
    print(f"configurations ({invoked('bench')} run --configs a,b):")
    for name, cfg in configs.CONFIGS.items():
        print(f"  {name:<18} {configs.describe(cfg)}")
    print("\npresets (--preset):")
    for name, preset in configs.PRESETS.items():
        print(f"  {name:<6} {preset.description}\n         configs: {', '.join(preset.configs)}")
    return 0


def add_run_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run configurations side by side and write a CSV under --out")
    g = p.add_argument_group("the sweep")
    g.add_argument("--device", choices=("cpu", "gpu", "all"), default=DEFAULTS["device"], help="(default: cpu)")
    g.add_argument("--preset", choices=tuple(configs.PRESETS), default=DEFAULTS["preset"], help="(default: quick)")
    g.add_argument("--configs", metavar="NAME,...", help="configurations to run (default: the preset's); "
                                                         f"see {invoked('bench')} list")
    g.add_argument("--repeats", type=positive_int, help="runs of each configuration (default: the preset's)")
    g.add_argument("--timeout", type=positive_int, metavar="S", help="seconds per configuration (default: the "
                                                                     "preset's)")
    g.add_argument("--figures", action="store_true", help="write confusion matrices and prediction grids")
    g.add_argument("--remeasure", action="store_true",
                   help="measure this machine's matmul peak and the model's FLOPs again instead of reusing the "
                        "values cached for this machine and TensorFlow version")
    g.add_argument("--out", default=DEFAULTS["out"], metavar="DIR", help="where results go (default: results)")
    g.add_argument("--resume", nargs="?", const="latest", metavar="RUN_CSV",
                   help="continue the newest (or the given) run: skip rows already there")
    # Every knob a sweep may override, e.g. --epochs, --num-images, --model-handle.
    add_knob_flags(p, SWEEP)
    p.set_defaults(func=cmd_run)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=invoked("bench"),
                           description="Compare ways to feed and compile the flowers transfer-learning job.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    p = sub.add_parser("list", help="list configurations and presets")
    p.set_defaults(func=cmd_list)
    for module in (report, compare, recommend, dataservice, loopback):
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    return run_main(build_parser(), argv)
