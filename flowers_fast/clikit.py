"""What every command line of the project shares: one-line usage errors, flags generated from
RunConfig's knob declarations, and ``run_main``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading

from .config import SWEEP, RunConfig, check_value, flag_of, kind_of, knobs
from .errors import BROKEN_PIPE_EXIT_CODE, INTERRUPTED_EXIT_CODE, UserError, one_line, raise_on_sigterm


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes print one line naming the flag (not the whole usage block), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse ``type``: a number, not NaN or infinity."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def knob_type(name: str):
    """argparse ``type`` that checks a value as RunConfig's knob ``name`` does, for commands that
    take the same value outside ``train`` (e.g. ``export-model --seed``)."""
    return _parse(next(f for f in dataclasses.fields(RunConfig) if f.name == name))


def _parse(f: dataclasses.Field):
    """argparse ``type`` for knob ``f``: convert, then the knob's own checks."""
    kind = kind_of(f)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        problem = check_value(f, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_knob_flags(parser: argparse.ArgumentParser, where: str) -> None:
    """One flag per RunConfig knob offered ``where`` (config.TRAIN or config.SWEEP), grouped as
    declared. Absent flags stay out of the namespace: the configuration's value stands."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in knobs(where):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        shown = "default: off" if f.default is False else "default: on" if f.default is True else \
            f"default: {f.default}" if f.default is not None else "default: unset"
        if where == SWEEP:
            shown = "default: the preset's or configuration's"
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{meta['help']} ({shown})")
        if kind_of(f) is bool:
            group.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(flag_of(f), type=_parse(f), choices=meta["choices"],
                               metavar=meta["metavar"] or (None if meta["choices"] else f.name.upper()), **common)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: knob values from a JSON file (``bench tune``'s best.json); flags override it."""
    parser.add_argument("--config", metavar="FILE", help="knob values from a JSON file, such as bench tune's "
                        "best.json (keys: the knob names with underscores); flags given too override it")


def given_knobs(args: argparse.Namespace, where: str) -> dict:
    """The knob values the user gave on the command line (see add_knob_flags)."""
    return {f.name: getattr(args, f.name) for f in knobs(where) if hasattr(args, f.name)}


def run_main(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse, run, and turn user mistakes into one line and a distinct exit code; SIGTERM is
    handled like Ctrl-C (exit 143 instead of 130)."""
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:
        raise_on_sigterm()
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"{parser.prog}: {'stopped by SIGTERM' if hasattr(exc, 'exit_code') else 'interrupted'}",
              file=sys.stderr)
        return getattr(exc, "exit_code", INTERRUPTED_EXIT_CODE)
    except BrokenPipeError:
        # The reader went away (``... | head``): drop the rest quietly, as Python's docs advise.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
            pass
        return BROKEN_PIPE_EXIT_CODE
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
