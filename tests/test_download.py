"""flowers_fast.download against a small archive served from 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flowers_fast import download
from flowers_fast.download import MARKER, cache_dir, fetch_flowers
from flowers_fast.errors import DownloadError, OfflineError

CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
TIMEOUT = 5  # seconds, for every network call in these tests


def make_tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_flowers() -> bytes:
    # Random bytes so gzip cannot shrink it: big enough to span several reads and a resume.
    rng = random.Random(0)
    members = {"flower_photos/LICENSE.txt": b"CC-BY-2.0\n"}
    for cls in CLASSES:
        for i in range(2):
            members[f"flower_photos/{cls}/{i}.jpg"] = rng.randbytes(20_000)
    return make_tgz(members)


ARCHIVE = fake_flowers()
SHA = hashlib.sha256(ARCHIVE).hexdigest()


class Server:
    """Serves ``files`` (path -> bytes); honours ``Range: bytes=N-`` with 206 unless told not to."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.honour_range = True
        self.truncate_at: int | None = None  # send this many bytes, then hang up
        self.delay = 0.0  # per-request pause, to make concurrent fetches overlap
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                time.sleep(outer.delay)
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, rng = 0, self.headers.get("Range")
                if rng and outer.honour_range and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[len("bytes="):-1])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.truncate_at is not None:
                    body = body[: outer.truncate_at]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(TIMEOUT)

    def gets(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


@pytest.fixture
def server():
    srv = Server({"/flower_photos.tgz": ARCHIVE})
    yield srv
    srv.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(cache: Path, url: str, sha256: str | None = SHA, size: int | None = len(ARCHIVE)) -> Path:
    return fetch_flowers(cache, url=url, sha256=sha256, size=size, timeout=TIMEOUT, progress=False)


def assert_good(root: Path, cache: Path):
    assert root == cache / "flower_photos"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(CLASSES)
    assert (root / "daisy" / "0.jpg").stat().st_size == 20_000
    assert (root / MARKER).is_file()
    # Nothing half-done is left behind.
    assert not (cache / "flower_photos.tgz.part").exists()
    assert not (cache / "flower_photos.tgz").exists()
    assert not list(cache.glob(".flower_photos.extract-*"))


def test_good_download_extracts_and_marks(tmp_path, server):
    root = fetch_flowers(tmp_path, url=server.url("/flower_photos.tgz"), sha256=SHA, size=len(ARCHIVE),
                         timeout=TIMEOUT, progress=True)
    assert_good(root, tmp_path)
    assert server.gets("/flower_photos.tgz") == [None]


def test_second_call_needs_no_network(tmp_path, server):
    url = server.url("/flower_photos.tgz")
    first = fetch(tmp_path, url)
    server.stop()
    assert fetch(tmp_path, url) == first
    assert fetch(tmp_path, f"http://127.0.0.1:{closed_port()}/flower_photos.tgz") == first


def test_without_sha_or_size_still_works(tmp_path, server):
    assert_good(fetch(tmp_path, server.url("/flower_photos.tgz"), sha256=None, size=None), tmp_path)


def test_wrong_sha256_raises_and_leaves_nothing(tmp_path, server):
    with pytest.raises(DownloadError) as exc:
        fetch(tmp_path, server.url("/flower_photos.tgz"), sha256="0" * 64)
    assert not isinstance(exc.value, OfflineError)
    msg = str(exc.value)
    assert "flower_photos.tgz.part" in msg and "--data-dir" in msg and "\n" not in msg
    assert not (tmp_path / "flower_photos.tgz.part").exists()
    assert not (tmp_path / "flower_photos").exists()


def test_wrong_size_raises(tmp_path, server):
    with pytest.raises(DownloadError, match="bytes instead of"):
        fetch(tmp_path, server.url("/flower_photos.tgz"), size=len(ARCHIVE) + 1)
    assert not (tmp_path / "flower_photos.tgz.part").exists()


def test_resumes_from_partial_file(tmp_path, server):
    half = len(ARCHIVE) // 2
    (tmp_path / "flower_photos.tgz.part").write_bytes(ARCHIVE[:half])
    assert_good(fetch(tmp_path, server.url("/flower_photos.tgz")), tmp_path)
    assert server.gets("/flower_photos.tgz") == [f"bytes={half}-"]


def test_restarts_when_server_ignores_range(tmp_path, server):
    server.honour_range = False
    (tmp_path / "flower_photos.tgz.part").write_bytes(b"x" * 1000)  # junk that must not survive
    assert_good(fetch(tmp_path, server.url("/flower_photos.tgz")), tmp_path)
    assert server.gets("/flower_photos.tgz") == ["bytes=1000-"]


def test_restarts_when_partial_file_is_too_long_for_the_server(tmp_path, server):
    # No expected size given, so only the server's 416 tells us the .part is useless.
    (tmp_path / "flower_photos.tgz.part").write_bytes(b"x" * (len(ARCHIVE) + 10))
    assert_good(fetch(tmp_path, server.url("/flower_photos.tgz"), size=None), tmp_path)
    assert server.gets("/flower_photos.tgz") == [f"bytes={len(ARCHIVE) + 10}-", None]


def test_interrupted_download_keeps_part_then_resumes(tmp_path, server):
    url = server.url("/flower_photos.tgz")
    server.truncate_at = 50_000
    with pytest.raises(OfflineError):
        fetch(tmp_path, url)
    part = tmp_path / "flower_photos.tgz.part"
    assert part.stat().st_size == 50_000
    assert not (tmp_path / "flower_photos").exists()
    server.truncate_at = None
    assert_good(fetch(tmp_path, url), tmp_path)
    assert server.gets("/flower_photos.tgz")[-1] == "bytes=50000-"


def test_unreachable_url_is_offline_error(tmp_path):
    with pytest.raises(OfflineError) as exc:
        fetch(tmp_path, f"http://127.0.0.1:{closed_port()}/x.tgz")
    msg = str(exc.value)
    assert "--data-dir" in msg and "--dataset synthetic" in msg and "\n" not in msg
    assert exc.value.exit_code == 6
    assert not (tmp_path / "x").exists()


def test_http_error_is_not_offline(tmp_path, server):
    with pytest.raises(DownloadError, match="HTTP 404") as exc:
        fetch(tmp_path, server.url("/missing.tgz"))
    assert not isinstance(exc.value, OfflineError)


def test_concurrent_fetches_share_one_download(tmp_path, server):
    server.delay = 0.3  # so the second caller arrives while the first is still downloading
    url = server.url("/flower_photos.tgz")
    start = threading.Barrier(2, timeout=TIMEOUT)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            start.wait()
            results.append(fetch(tmp_path, url))
        except BaseException as e:  # surfaced below; a thread cannot fail the test itself
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(results) == 2 and results[0] == results[1]
    assert_good(results[0], tmp_path)
    assert server.gets("/flower_photos.tgz") == [None]  # the waiter found it done


def test_concurrent_processes_share_one_download(tmp_path, server):
    server.delay = 0.3
    code = ("import sys; from flowers_fast.download import fetch_flowers; "
            "print(fetch_flowers(sys.argv[1], url=sys.argv[2], sha256=sys.argv[3], size=int(sys.argv[4]), "
            "timeout=5, progress=False))")
    args = [sys.executable, "-c", code, str(tmp_path), server.url("/flower_photos.tgz"), SHA, str(len(ARCHIVE))]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=TIMEOUT * 2) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {o.strip() for o, _ in outs} == {str(tmp_path / "flower_photos")}
    assert_good(tmp_path / "flower_photos", tmp_path)
    assert len(server.gets("/flower_photos.tgz")) == 1


@pytest.mark.parametrize("evil", ["../evil", "flower_photos/../../evil", "ABSOLUTE"])
def test_unsafe_archive_member_is_rejected(tmp_path, evil):
    cache = tmp_path / "cache"
    if evil == "ABSOLUTE":
        evil = str(tmp_path / "evil")
    data = make_tgz({"flower_photos/daisy/0.jpg": b"jpg", evil: b"pwned"})
    srv = Server({"/flower_photos.tgz": data})
    try:
        with pytest.raises(DownloadError, match="unsafe member"):
            fetch(cache, srv.url("/flower_photos.tgz"), sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    finally:
        srv.stop()
    assert not (tmp_path / "evil").exists()
    assert not (cache / "flower_photos").exists()
    assert not list(cache.glob(".flower_photos.extract-*"))


def test_archive_without_top_folder_is_rejected(tmp_path):
    data = make_tgz({"daisy/0.jpg": b"jpg"})
    srv = Server({"/flower_photos.tgz": data})
    try:
        with pytest.raises(DownloadError, match="no top folder flower_photos"):
            fetch(tmp_path, srv.url("/flower_photos.tgz"), sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    finally:
        srv.stop()
    assert not (tmp_path / "flower_photos").exists()


def test_unmarked_leftover_folder_is_replaced(tmp_path, server):
    stale = tmp_path / "flower_photos"
    (stale / "daisy").mkdir(parents=True)
    (stale / "half.jpg").write_bytes(b"")
    assert_good(fetch(tmp_path, server.url("/flower_photos.tgz")), tmp_path)
    assert not (stale / "half.jpg").exists()


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(download.ENV_CACHE, raising=False)
    default = cache_dir()
    assert default == tmp_path / "home" / ".cache" / "flowers_fast" and default.is_dir()
    monkeypatch.setenv(download.ENV_CACHE, str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert cache_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert (tmp_path / "explicit").is_dir()


def test_real_constants_look_right():
    assert download.FLOWERS_URL.startswith("https://") and download.FLOWERS_URL.endswith("/flower_photos.tgz")
    assert download.FLOWERS_SIZE == 228_813_984
    assert len(download.FLOWERS_SHA256) == 64 and int(download.FLOWERS_SHA256, 16) >= 0
