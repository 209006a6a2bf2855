"""User-facing errors and every exit code of the project's command lines, in one place.

A UserError prints as one line and exits with its class's code; anything else is a bug and
keeps its traceback.

| code | meaning |
| --- | --- |
| 2 | usage: a bad flag or value |
| 3 | data: a dataset folder or image file |
| 4 | model: a model handle or checkpoint |
| 5 | download: a corrupt or failed download |
| 6 | offline: a download that needs the network |
| 7 | device: the asked-for device is not there |
| 8 | output: a result or figure cannot be written |
| 9 | a sweep finished, but some configurations failed (see their rows) |
| 10 | cluster: a multi-worker peer never came, died, or disagrees |
| 130 | interrupted (Ctrl-C) |
| 143 | terminated (SIGTERM) |

Messages that name a command name it as the user invoked it (:func:`invoked`).
"""

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


class OutputError(UserError):
    exit_code = 8


class ClusterError(UserError):
    """A multi-worker run failed as a cluster: a peer did not come, died or disagrees."""

    exit_code = 10


RUN_FAILED_EXIT_CODE = 9
INTERRUPTED_EXIT_CODE = 130
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


# python -m <module>  <->  the console script pyproject installs for it
SCRIPTS = {"bench": "flowers-bench", "flowers_fast": "flowers-fast"}


def invoked(module: str) -> str:
    """How the user called this command line: ``flowers-bench`` or ``python -m bench``, so that
    messages name a command that works for them."""
    script = SCRIPTS.get(module)
    return script if script and Path(sys.argv[0]).name == script else f"python -m {module}"
