"""Fetching flower_photos.tgz once into a local cache, safely.

Every step is built so that an interrupted or concurrent run never leaves something that a later
run would mistake for a good dataset: the download goes to a ``.part`` file (resumable), the archive
is checked against a known size and SHA-256, extraction happens in a private temporary folder that
is renamed into place only when complete, and a file lock serialises whole fetches.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from .errors import DownloadError, OfflineError, OutputError
from .outputs import temp_dir

try:  # POSIX only; elsewhere concurrent fetches are simply not guarded.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
# From tensorflow/datasets: tensorflow_datasets/datasets/tf_flowers/checksums.tsv
# (also tensorflow_datasets/url_checksums/tf_flowers.txt in older releases).
FLOWERS_SIZE = 228_813_984
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"

ENV_CACHE = "FLOWERS_FAST_CACHE"
MARKER = ".complete"  # same marker name the other cached datasets use
_CHUNK = 1 << 20
_ALTERNATIVES = "use --data-dir PATH (a local flower_photos folder) or --dataset synthetic"


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where downloads and generated data live: ``explicit``, else $FLOWERS_FAST_CACHE, else
    ~/.cache/flowers_fast. Created if missing."""
    raw = explicit or os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "flowers_fast"
    path = Path(raw).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise FileExistsError(17, "a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-").close()
    except OSError as e:
        # Name where the folder came from, so the advice fits what the user actually did.
        if explicit:
            where, fix = f"--cache-dir {path}", "pass a folder you can write to"
        elif os.environ.get(ENV_CACHE):
            where, fix = f"{ENV_CACHE}={path}", f"set {ENV_CACHE} to a folder you can write to"
        else:
            where, fix = f"the cache folder {path}", f"set {ENV_CACHE} to a folder you can write to"
        raise OutputError(f"{where}: not a writable folder ({e.strerror or e}); {fix}") from None
    return path


def fetch_flowers(
    cache: str | os.PathLike,
    url: str = FLOWERS_URL,
    sha256: str | None = FLOWERS_SHA256,
    size: int | None = FLOWERS_SIZE,
    timeout: float = 60,
    progress: bool = True,
    name: str | None = None,
) -> Path:
    """The extracted top folder of the archive at ``url`` (``flower_photos`` by default),
    downloading, verifying and extracting it into ``cache`` first if that was not done before.

    ``name`` is the folder the archive holds at its top; by default the archive's file name
    without ``.tgz``/``.tar.gz``.
    """
    cache = Path(cache)
    archive_name = PurePosixPath(urllib.parse.urlsplit(url).path).name or "download.tgz"
    name = name or _strip_archive_suffix(archive_name)
    dest = cache / name
    # Fast path without the lock: the marker only ever appears together with a complete folder.
    if (dest / MARKER).is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"{name}.lock"):
        # Another process may have finished while we waited for the lock.
        if (dest / MARKER).is_file():
            return dest
        archive = cache / archive_name
        if archive.is_file() and _mismatch(archive, size, sha256) is not None:
            archive.unlink()  # a leftover we cannot trust
        if not archive.is_file():
            part = cache / f"{archive_name}.part"
            _check_space(cache, part, size)
            _download(url, part, size, timeout, progress)
            _verify_or_delete(part, size, sha256)
            # Keep the verified archive until extraction succeeds, so a failed extraction
            # (full disk, killed process) does not cost another download.
            os.replace(part, archive)
        _extract(archive, cache, name, sha256)
        archive.unlink(missing_ok=True)  # the extracted folder is all anyone reads
    return dest


def _strip_archive_suffix(filename: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock held across processes (and across threads: each open() is its own lock
    holder under flock), released by the kernel even if this process dies."""
    with open(path, "a+b") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process fetching into {path.parent} ...", file=sys.stderr)
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_space(cache: Path, part: Path, size: int | None) -> None:
    # Failing now beats failing with ENOSPC after minutes of downloading. Need: the rest of the
    # download plus roughly the archive's size again for the extracted files.
    if not size:
        return
    have = part.stat().st_size if part.is_file() else 0
    need = max(size - have, 0) + int(size * 1.1)
    free = shutil.disk_usage(cache).free
    if free < need:
        raise DownloadError(f"not enough disk space in {cache}: need about {need >> 20} MiB, "
                            f"{free >> 20} MiB free; set {ENV_CACHE} to another folder or {_ALTERNATIVES}")


def _offline(url: str, err: BaseException | str) -> OfflineError:
    reason = getattr(err, "reason", None) or err
    return OfflineError(f"cannot download {url} ({reason}); no network? Rerun to resume, or {_ALTERNATIVES}")


def _download(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> None:
    """Fill ``part`` with the bytes at ``url``, continuing a previous partial download when the
    server supports ranges. Leaves ``part`` in place on network failure so the next run resumes."""
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset >= size:
        if offset == size:
            return  # already complete; verification decides whether it is good
        part.unlink()  # longer than the real file: cannot be a prefix of it
        offset = 0
    try:
        resp = _open(url, offset, timeout)
        if offset and (resp is None or not _resumes_at(resp, offset)):
            # No usable resume: 416 (our partial file does not fit the server's), a plain 200
            # (server ignores ranges) or a 206 for some other range. Start over from byte 0.
            offset = 0
            if resp is not None and resp.status != 200:
                resp.close()
                resp = None
            if resp is None:
                resp = _open(url, 0, timeout)
        with resp:
            length = resp.headers.get("Content-Length", "")
            declared = offset + int(length) if length.isdigit() else None  # what the server promised
            total = size if size is not None else declared
            with open(part, "ab" if offset else "wb") as out, _bar(total, offset, part.name, progress) as bar:
                written = offset
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    _write(out, chunk, part)
                    written += len(chunk)
                    bar.update(len(chunk))
                    if size is not None and written > size:
                        break  # not the file we expect; verification will reject it
            if declared is not None and written < declared:
                # The connection ended early: keep what we have so the next run resumes. (A server
                # that sends all it promised but less than `size` is caught by verification instead.)
                raise _offline(url, f"connection closed after {written} of {declared} bytes")
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}; "
                            f"retry later, or {_ALTERNATIVES}") from e
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
        raise _offline(url, e) from e


def _write(out, chunk: bytes, part: Path) -> None:
    # Kept apart so a full disk reads as a disk problem, not as being offline.
    try:
        out.write(chunk)
    except OSError as e:
        raise DownloadError(f"cannot write {part}: {e.strerror or e}; free some space or set {ENV_CACHE}") from e


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "flowers_fast"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except ValueError as e:  # malformed URL: no amount of retrying helps
        raise DownloadError(f"cannot download {url}: {e}") from e
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            e.close()
            return None
        raise


def _resumes_at(resp, offset: int) -> bool:
    """Whether the response continues exactly at ``offset`` (a 206 whose Content-Range says so)."""
    if resp.status != 206:
        return False
    content_range = resp.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
    try:
        start = int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return False
    return start == offset


def _bar(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                unit_divisor=1024, disable=not enabled, leave=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _mismatch(path: Path, size: int | None, sha256: str | None) -> str | None:
    """Why ``path`` is not the expected file, or None if it is."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"{actual_size} bytes instead of {size}"
    if sha256 is not None and _sha256(path) != sha256.lower():
        return "SHA-256 does not match"
    return None


def _verify_or_delete(part: Path, size: int | None, sha256: str | None) -> None:
    # A bad file is deleted rather than kept for resuming: a resume would only extend the damage.
    why = _mismatch(part, size, sha256)
    if why is not None:
        part.unlink(missing_ok=True)
        raise DownloadError(f"downloaded file {part} is corrupt ({why}) and was deleted; "
                            f"retry, or use --data-dir PATH (a local flower_photos folder)")


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """All members, refusing any that could write outside the extraction folder."""
    members = tar.getmembers()
    for m in members:
        path = PurePosixPath(m.name)
        bad = (m.name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts
               or (len(m.name) > 1 and m.name[1] == ":"))
        if not bad and (m.issym() or m.islnk()):
            target = PurePosixPath(m.linkname)
            bad = target.is_absolute() or ".." in target.parts
        if not bad and not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            bad = True  # devices, fifos: never part of an image dataset
        if bad:
            raise DownloadError(f"archive {archive} has an unsafe member {m.name!r}; refusing to extract it; "
                                f"use --data-dir PATH (a local flower_photos folder)")
    return members


def _extract(archive: Path, cache: Path, name: str, sha256: str | None) -> None:
    """Extract ``archive`` and move its ``name`` folder to ``cache/name`` in one rename."""
    for stale in cache.glob(f".{name}.extract-*"):  # left by a killed run; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(cache, f".{name}.extract-")
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = _safe_members(tar, archive)
                # Belt and braces: the stdlib's own "data" filter where this Python has it.
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
        except DownloadError:
            archive.unlink(missing_ok=True)  # re-downloading the same bytes would not help
            raise
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            archive.unlink(missing_ok=True)
            raise DownloadError(f"archive {archive} is unreadable ({e}) and was deleted; "
                                f"retry, or use --data-dir PATH (a local flower_photos folder)") from e
        except OSError as e:  # disk full, permissions: the archive itself is fine, keep it
            raise DownloadError(f"cannot extract {archive} into {cache}: {e.strerror or e}") from e
        top = tmp / name
        if not top.is_dir():
            archive.unlink(missing_ok=True)
            raise DownloadError(f"archive {archive} has no top folder {name}/; "
                                f"use --data-dir PATH (a local flower_photos folder)")
        # The marker goes in before the rename, so the folder and its marker appear together.
        (top / MARKER).write_text(f"{sha256 or ''}\n")
        dest = cache / name
        if dest.exists() or dest.is_symlink():
            # Unmarked, so incomplete (or not ours to trust): replace it.
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            else:
                dest.unlink()
        os.replace(top, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
