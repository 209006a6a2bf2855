"""Named outputs, one way for every command (``train --json/--figures/--save``, ``bench report
--markdown/--html/--plot``, ``bench run``'s files):

* :class:`Outputs` checks them all before any long work: an output that exists (a file, a
  symlink, a dangling symlink) is refused unless ``--overwrite`` (:func:`add_overwrite_flag`) is
  given; never, even then, an input of the command, a run's ``.csv``/``.json`` (what ``--resume``
  and ``bench report`` read), or two outputs at one path. Folders it creates for them are removed
  again when the command fails (only if still empty: nothing the user had, nothing written).
* :func:`atomic_open`/:func:`atomic_write`: a file written whole or not at all (temporary file
  beside it, fsync, rename), with the mode the umask gives a new file; ``mkstemp`` alone would
  leave 0600 behind the rename. A symlink at the target is replaced, never written through.
* :func:`spreadsheet_safe`/:func:`spreadsheet_text`: text that goes into a CSV, neutralised
  against formula injection (OWASP: a leading ``'``) and read back exactly.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, UserError

# --- file modes ---------------------------------------------------------------------------------


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (``os.umask`` must set
    one to read it, and another thread creating a file meanwhile would get the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0666 less the umask (0644 under 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def temp_dir(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` (0700) with the mode ``mkdir`` would give: the folder is renamed into
    place, and a saved model or cache must not become private to its writer."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


@contextmanager
def atomic_open(target: Path, mode: str = "w", **kwargs):
    """``with atomic_open(path) as f: ...``: ``f`` is a temporary file beside ``target`` that
    replaces it in one rename when the block ends without an exception (else it is removed; also
    on Ctrl-C). Raises OSError; callers turn it into their one-line OutputError."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(target: Path, content: str | bytes, encoding: str = "utf-8") -> Path:
    if isinstance(content, bytes):
        with atomic_open(target, "wb") as f:
            f.write(content)
    else:
        with atomic_open(target, "w", encoding=encoding) as f:
            f.write(content)
    return Path(target)


# --- CSV text -----------------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


def _formula_like(value: str) -> bool:
    """Whether a spreadsheet would run ``value`` as a formula (a number is data, not a formula);
    a value already starting with ``'`` counts when what follows does, so that the prefix is
    undone exactly (:func:`spreadsheet_text`)."""
    if value.startswith("'"):
        return _formula_like(value[1:])
    return value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value)


def spreadsheet_safe(value):
    """``value`` for a CSV cell: text a spreadsheet would evaluate (``=HYPERLINK(...)``, ``+1+1``,
    ``@SUM``, a leading tab or CR) gets a leading ``'``; numbers and other values are unchanged."""
    return "'" + value if isinstance(value, str) and _formula_like(value) else value


def spreadsheet_text(value):
    """The inverse of :func:`spreadsheet_safe`, for reading such a CSV back."""
    return value[1:] if isinstance(value, str) and value.startswith("'") and _formula_like(value[1:]) else value


# --- checking named outputs ---------------------------------------------------------------------

OVERWRITE_HELP = "replace output files that already exist (default: refuse them); never an input, nor a run's " \
                 "CSV or JSON"


def add_overwrite_flag(parser, extra: str = "") -> None:
    """The one ``--overwrite`` flag, the same on every command that writes named outputs."""
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + extra)


def _real(path: Path) -> str:
    return os.path.realpath(os.path.abspath(path))


def _results_header(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline(4096).strip().split(",")
    except OSError:
        return False
    return {"name", "device", "repeat", "status"} <= set(header)


def is_run_file(path: Path) -> bool:
    """A results file that ``bench run --resume`` and ``bench report`` read: a CSV with a results
    header (``run-X.csv``, ``latest.csv``, a copy), or a run's settings: the ``.json`` beside such a
    CSV, or a ``run-*.json`` holding a sweep's settings (its CSV comes with the first finished row)."""
    path = Path(_real(path))
    if not path.is_file():
        return False
    if path.suffix == ".csv":
        return _results_header(path)
    if path.suffix != ".json":
        return False
    if path.with_suffix(".csv").is_file() and _results_header(path.with_suffix(".csv")):
        return True
    if path.name.startswith("run-") and path.stat().st_size < 1 << 20:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(saved, dict) and "preset" in saved
    return False


class Outputs:
    """The named outputs of one command, checked together before its long work::

        with Outputs(args.overwrite, inputs=csvs) as outputs:
            md = outputs.file(args.markdown, "--markdown")
            ...  # the work; a failure removes the folders made for md, if still empty

    ``inputs`` (files) are never written; ``what_inputs`` names them in the error."""

    def __init__(self, overwrite: bool = False, inputs=(), what_inputs: str = "an input of this command"):
        self.overwrite = overwrite
        self.inputs = {_real(Path(p)) for p in inputs}
        self.what_inputs = what_inputs
        self.claimed: dict[str, str] = {}  # real path -> the flag that names it
        self.created: list[Path] = []  # folders made here, outermost first
        self.whole: list[str] = []  # folders written whole at the end (new_folder): nothing else goes in

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.remove_created()
        return False

    def remove_created(self) -> None:
        """Remove the folders this command made, innermost first, if nothing is in them."""
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                pass  # something was written there: it stays
        self.created = []

    def _claim(self, path: Path, flag: str) -> None:
        real = _real(path)
        other = self.claimed.get(real)
        if other is not None:
            same = "twice" if other == flag else f"as {other}"
            raise UserError(f"{flag} {path}: the same file is named {same}; give each output its own name")
        self.claimed[real] = flag

    def mkdirs(self, folder: Path, flag: str, path: Path | None = None) -> Path:
        """``folder`` created (with its missing parents, recorded) and writable, or an OutputError
        naming ``flag`` and ``path`` (the output, default ``folder`` itself)."""
        path = folder if path is None else path
        missing = []
        probe = Path(os.path.abspath(folder))
        while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        try:
            if not probe.is_dir():
                raise NotADirectoryError(20, f"{probe} is a file, not a folder")
            for made in reversed(missing):
                try:
                    made.mkdir()
                except FileExistsError:  # another process made it meanwhile (cluster tasks, one --out)
                    if not made.is_dir():
                        raise
                    continue  # theirs: never removed by this command's clean-up
                self.created.append(made)
            tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-").close()
        except OSError as exc:
            how = "cannot be created" if missing or path != folder else "not writable"
            raise OutputError(f"{flag} {path}: {how} ({exc.strerror or exc}); pass a folder you can write to") \
                from None
        return folder

    def file(self, path, flag: str, fix: str = "pass a new file name") -> Path:
        """Check one output file; returns it as a Path. ``fix``: what to do when it exists."""
        path = Path(path).expanduser()
        real = _real(path)
        if real in self.inputs:
            raise OutputError(f"{flag} {path}: is {self.what_inputs}; pass another file name (nothing is "
                              "overwritten, even with --overwrite)")
        if any(real.startswith(folder + os.sep) for folder in self.whole):
            raise UserError(f"{flag} {path}: is inside the folder --save writes whole; pass a file elsewhere")
        self._claim(path, flag)
        there = path.is_symlink() or path.exists()
        if there and path.is_dir() and not path.is_symlink():
            raise OutputError(f"{flag} {path}: is a folder; pass a file name")
        if there and is_run_file(path):
            raise OutputError(f"{flag} {path}: is a results file of bench run (what --resume and bench report "
                              "read); pass another file name (nothing is overwritten, even with --overwrite)")
        if there and not self.overwrite:
            link = " (a symlink)" if path.is_symlink() else ""
            raise OutputError(f"{flag} {path}: already exists{link}; {fix}, or add --overwrite to replace it")
        self.mkdirs(path.parent, flag, path)
        return path

    def folder(self, path, flag: str) -> Path:
        """An output folder that may already exist (the files in it are checked with :meth:`file`)."""
        path = Path(path).expanduser()
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise OutputError(f"{flag} {path}: is a file, not a folder; pass a folder you can write to")
        return self.mkdirs(path, flag)

    def new_folder(self, path, flag: str) -> Path:
        """A folder written whole at the end (``train --save``, ``export-model``): it must not hold
        anything yet, whatever ``--overwrite`` says (a model folder is never replaced); its parent
        must take new files."""
        path = Path(path).expanduser()
        self._claim(path, flag)
        self.whole.append(_real(path))
        if path.is_symlink() or path.exists():
            if not path.is_dir():
                raise OutputError(f"{flag} {path}: already exists as a file; pass a new folder")
            if any(path.iterdir()):
                raise OutputError(f"{flag} {path}: already exists and is not empty; pass a new folder (nothing is "
                                  "overwritten)")
        self.mkdirs(path.parent, flag, path)
        return path

