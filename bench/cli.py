"""``python -m bench`` (installed as ``flowers-bench``): run, list, report, compare, recommend,
tune, dataservice, loopback: one module per command, each adding its own parser (``run``'s sweep-wide
flags are generated from RunConfig's knob declarations)."""

from __future__ import annotations

import argparse

from flowers_fast.clikit import OneLineParser, run_main
from flowers_fast.errors import invoked

from . import compare, configs, dataservice, loopback, recommend, report, run, tune


def cmd_list(args) -> int:
    print(f"configurations ({invoked('bench')} run --configs a,b):")
    for name, cfg in configs.CONFIGS.items():
        print(f"  {name:<18} {configs.describe(cfg)}")
    print("\npresets (--preset):")
    for name, preset in configs.PRESETS.items():
        print(f"  {name:<6} {preset.description}\n         configs: {', '.join(preset.configs)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=invoked("bench"),
                           description="Compare ways to feed and compile the flowers transfer-learning job.")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parser(sub)
    p = sub.add_parser("list", help="list configurations and presets")
    p.set_defaults(func=cmd_list)
    for module in (report, compare, recommend, tune, dataservice, loopback):
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    return run_main(build_parser(), argv)
