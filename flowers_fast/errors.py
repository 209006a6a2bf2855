"""User-facing errors and every exit code of the project's command lines, in one place.

A UserError prints as one line and exits with its class's code; anything else is a bug and
keeps its traceback.

| code | meaning |
| --- | --- |
| 1 | ``bench compare``: a configuration regressed beyond ``--fail-if`` (or stopped finishing) |
| 2 | usage: a bad flag or value |
| 3 | data: a dataset folder or image file |
| 4 | model: a model handle or checkpoint |
| 5 | download: a corrupt or failed download |
| 6 | offline: a download that needs the network |
| 7 | device: the asked-for device, or a feature of it (native bfloat16), is not there |
| 8 | output: a result or figure cannot be written |
| 9 | a sweep finished, but some configurations failed (see their rows) |
| 10 | cluster: a multi-worker peer never came, died, or disagrees |
| 130 | interrupted (Ctrl-C) |
| 141 | standard output closed early (e.g. piped into ``head``): the rest is dropped quietly |
| 143 | stopped by SIGTERM (e.g. ``kill``, a job scheduler): cleaned up like Ctrl-C |

Messages that name a command name it as the user invoked it (:func:`invoked`).
"""

import signal
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback."""

    exit_code = 2


class DataError(UserError):
    exit_code = 3


class ModelError(UserError):
    exit_code = 4


class DownloadError(UserError):
    exit_code = 5


class OfflineError(DownloadError):
    exit_code = 6


class DeviceError(UserError):
    exit_code = 7


class UnsupportedError(DeviceError):
    """The device is there but lacks what the run asks for (e.g. native bfloat16). ``bench run``
    records such a configuration as ``skipped``, with this message, instead of failing."""


class OutputError(UserError):
    exit_code = 8


class ClusterError(UserError):
    """A multi-worker run failed as a cluster: a peer did not come, died or disagrees."""

    exit_code = 10


REGRESSION_EXIT_CODE = 1
RUN_FAILED_EXIT_CODE = 9
INTERRUPTED_EXIT_CODE = 130
BROKEN_PIPE_EXIT_CODE = 141
TERMINATED_EXIT_CODE = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that the same clean-up runs (the sweep marks the
    running configuration interrupted and kills its worker) and nothing finished is lost."""

    exit_code = TERMINATED_EXIT_CODE


def raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in this (main) thread."""
    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def printable(text) -> str:
    """``text`` (a path, or a message naming one) safe to print or write as UTF-8: the bytes of a
    file name that is not valid UTF-8 (which Python holds as surrogate escapes, e.g. 'caf\\udce9')
    shown as ``\\xe9``, as ``ls -b`` would."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(message: str) -> str:
    """``message`` on one line: a file name may hold a newline, which must not split the error."""
    return printable(message).replace("\r", "\\r").replace("\n", "\\n")


# python -m <module>  <->  the console script pyproject installs for it
SCRIPTS = {"bench": "flowers-bench", "flowers_fast": "flowers-fast"}


def invoked(module: str) -> str:
    """How the user called this command line: ``flowers-bench`` or ``python -m bench``, so that
    messages name a command that works for them."""
    script = SCRIPTS.get(module)
    return script if script and Path(sys.argv[0]).name == script else f"python -m {module}"
