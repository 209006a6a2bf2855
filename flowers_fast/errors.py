"""User-facing errors: each prints as one line and exits with its own code.

Anything that is not a UserError is a bug and keeps its traceback.
"""


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


INTERRUPTED_EXIT_CODE = 130
