"""Downloads (Range resume, checksums) and safe extraction, against a loopback HTTP server.

`LoopbackServer` is also used by test_voc12.py and test_coco14.py (loaded from this file by path).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cpal.data.download import (
    ArchiveError,
    ChecksumError,
    DownloadError,
    download,
    fetch_and_extract,
    parse_checksum,
    safe_extract,
)


class LoopbackServer:
    """Serves `files` on 127.0.0.1 with Range support; `cut[path] = n` cuts the next reply after n bytes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.sent: list[int] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                start = 0
                if rng and not server.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                limit = server.cut.pop(path, None)
                if limit is not None:
                    body = body[:limit]
                self.wfile.write(body)
                server.sent.append(len(body))
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


PAYLOAD = bytes(range(256)) * 4000  # ~1 MB, several read chunks


def test_download_verifies_and_names_file(server, tmp_path):
    server.files["a/file.bin"] = PAYLOAD
    dest = download(server.url("a/file.bin"), tmp_path / "file.bin", md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "file.bin.part").exists()
    # A verified file is reused without a request.
    n = len(server.requests)
    download(server.url("a/file.bin"), tmp_path / "file.bin", md5(PAYLOAD), progress=False)
    assert len(server.requests) == n


def test_checksum_mismatch_deletes_download(server, tmp_path):
    server.files["f.tar"] = PAYLOAD
    wrong = "md5:" + "0" * 32
    with pytest.raises(ChecksumError,
                       match=r"checksum mismatch for f\.tar.*expected md5:0{32}, got md5:[0-9a-f]{32}"):
        download(server.url("f.tar"), tmp_path / "f.tar", wrong, progress=False, hint="data.x.urls.y")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_with_wrong_checksum_is_kept_and_reported(server, tmp_path):
    (tmp_path / "f.tar").write_bytes(b"not the archive")
    with pytest.raises(ChecksumError, match="delete the file and rerun"):
        download(server.url("f.tar"), tmp_path / "f.tar", md5(PAYLOAD), progress=False)
    assert (tmp_path / "f.tar").read_bytes() == b"not the archive"
    assert server.requests == []


def test_interrupted_download_resumes_on_rerun(server, tmp_path):
    server.files["big.tgz"] = PAYLOAD
    server.cut["big.tgz"] = 300_000
    with pytest.raises(DownloadError, match=r"stopped after 300000 of 1024000 bytes.*rerun to resume"):
        download(server.url("big.tgz"), tmp_path / "big.tgz", md5(PAYLOAD), progress=False, retries=0)
    part = tmp_path / "big.tgz.part"
    assert part.stat().st_size == 300_000 and not (tmp_path / "big.tgz").exists()
    download(server.url("big.tgz"), tmp_path / "big.tgz", md5(PAYLOAD), progress=False, retries=0)
    assert (tmp_path / "big.tgz").read_bytes() == PAYLOAD and not part.exists()
    assert server.requests[-1] == ("big.tgz", "bytes=300000-")
    assert server.sent[-1] == len(PAYLOAD) - 300_000  # only the rest came over the wire


def test_interrupted_download_resumes_within_one_call(server, tmp_path):
    server.files["big.zip"] = PAYLOAD
    server.cut["big.zip"] = 123_457
    download(server.url("big.zip"), tmp_path / "big.zip", md5(PAYLOAD), progress=False, retries=2,
             retry_wait=0)
    assert (tmp_path / "big.zip").read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == [None, "bytes=123457-"]


def test_server_without_range_support_restarts(server, tmp_path):
    server.files["x.tar"] = PAYLOAD
    (tmp_path / "x.tar.part").write_bytes(b"garbage that must not be kept")
    server.ignore_range = True
    download(server.url("x.tar"), tmp_path / "x.tar", md5(PAYLOAD), progress=False)
    assert (tmp_path / "x.tar").read_bytes() == PAYLOAD


def test_complete_part_file_is_verified_not_refetched(server, tmp_path):
    server.files["x.tar"] = PAYLOAD
    (tmp_path / "x.tar.part").write_bytes(PAYLOAD)
    download(server.url("x.tar"), tmp_path / "x.tar", md5(PAYLOAD), progress=False)
    assert server.requests == [("x.tar", f"bytes={len(PAYLOAD)}-")]  # answered 416
    assert (tmp_path / "x.tar").read_bytes() == PAYLOAD


def test_http_error_names_url_and_hint(server, tmp_path):
    with pytest.raises(DownloadError, match=r"nope\.tar failed: HTTP 404.*data\.voc12\.urls\.voc"):
        download(server.url("nope.tar"), tmp_path / "nope.tar", None, progress=False, retries=3,
                 retry_wait=0, hint="data.voc12.urls.voc")
    assert len(server.requests) == 1  # a 404 is not retried
    with pytest.raises(ValueError, match="checksum"):  # a bad checksum spec fails before any request
        download(server.url("nope.tar"), tmp_path / "nope.tar", "md5:123", progress=False)
    assert len(server.requests) == 1


def test_parse_checksum():
    assert parse_checksum("md5:" + "A" * 32) == ("md5", "a" * 32)
    assert parse_checksum("b" * 64) == ("sha256", "b" * 64)
    assert parse_checksum("sha1:" + "c" * 40) == ("sha1", "c" * 40)
    for bad in ("md5:abc", "crc:" + "0" * 8, "", "xyz"):
        with pytest.raises(ValueError, match="checksum"):
            parse_checksum(bad)


# ---------------------------------------------------------------------------------------------------
# Safe extraction


def _tar(path: Path, members: list[tuple[str, str, str | bytes]]) -> Path:
    """members: (name, kind 'file' | 'dir' | 'sym' | 'lnk', data or link target)."""
    with tarfile.open(path, "w:gz" if path.suffix == ".tgz" else "w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "lnk": tarfile.LNKTYPE}[kind]
            if kind != "dir":
                info.linkname = data
            tar.addfile(info)
    return path


def _zip(path: Path, members: list[tuple[str, bytes]], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, target)
    return path


def test_safe_extract_tar_with_filter_and_inner_links(tmp_path):
    arc = _tar(tmp_path / "ok.tgz", [
        ("top/a/x.txt", "file", b"x"), ("top/b/y.txt", "file", b"y"), ("top/a/link", "sym", "x.txt"),
        ("top/a/hard", "lnk", "top/a/x.txt"), ("top/a/sub", "dir", ""),
    ])
    out = safe_extract(arc, tmp_path / "out", include=lambda n: n.startswith("top/a/"), progress=False)
    assert (out / "top/a/x.txt").read_bytes() == b"x"
    assert (out / "top/a/link").is_symlink() and (out / "top/a/link").read_bytes() == b"x"
    assert (out / "top/a/hard").read_bytes() == b"x"
    assert not (out / "top/b").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("members, message", [
    ([("ok.txt", "file", b"1"), ("../evil.txt", "file", b"2")], "contains '..'"),
    ([("/abs/evil.txt", "file", b"2")], "absolute path"),
    ([("a/../../evil.txt", "file", b"2")], "contains '..'"),
    ([("link", "sym", "../outside")], "leaves the target folder"),
    ([("link", "sym", "/etc/passwd")], "absolute path"),
    ([("hard", "lnk", "../outside")], "contains '..'"),
    # l1 -> '.', then l1/l2 -> '..': lexically inside, really outside.
    ([("l1", "sym", "."), ("l1/l2", "sym", "..")], "leaves the target folder"),
    # d -> '..' would be caught; d -> 'x' is fine, but a file written through a link to outside is not:
    ([("x", "dir", ""), ("esc", "sym", "x/../.."), ("esc/evil.txt", "file", b"2")],
     "leaves the target folder"),
])
def test_safe_extract_tar_rejects_escapes(tmp_path, members, message):
    work = tmp_path / "work"
    work.mkdir()
    arc = _tar(tmp_path / "bad.tar", members)
    with pytest.raises(ArchiveError, match=message):
        safe_extract(arc, work / "out", progress=False)
    assert list(work.iterdir()) == []  # neither the target nor a partial folder remains
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "work"]  # nothing written outside


def test_safe_extract_zip(tmp_path):
    arc = _zip(tmp_path / "ok.zip", [("train2014/a.jpg", b"a"), ("annotations/i.json", b"{}")])
    out = safe_extract(arc, tmp_path / "out", include=lambda n: n.startswith("train2014/"), progress=False)
    assert (out / "train2014/a.jpg").read_bytes() == b"a" and not (out / "annotations").exists()


@pytest.mark.parametrize("members, symlinks, message", [
    ([("ok", b"1"), ("../evil.txt", b"2")], None, "contains '..'"),
    ([("/evil.txt", b"2")], None, "absolute path"),
    ([("dir\\..\\..\\evil.txt", b"2")], None, "contains '..'"),
    ([], {"link": "../../outside"}, "leaves the target folder"),
])
def test_safe_extract_zip_rejects_escapes(tmp_path, members, symlinks, message):
    work = tmp_path / "work"
    work.mkdir()
    arc = _zip(tmp_path / "bad.zip", members, symlinks)
    with pytest.raises(ArchiveError, match=message):
        safe_extract(arc, work / "out", progress=False)
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "work"]


def test_safe_extract_rejects_non_archive(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArchiveError, match="neither a tar nor a zip"):
        safe_extract(tmp_path / "x.tar", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_fetch_and_extract_reuses_and_refreshes(server, tmp_path):
    data = _zip(tmp_path / "src.zip", [("d/a.txt", b"one")]).read_bytes()
    server.files["pkg.zip"] = data
    out = fetch_and_extract(server.url("pkg.zip"), md5(data), tmp_path / "dl", progress=False)
    assert out == tmp_path / "dl" / "extracted" / "pkg" and (out / "d/a.txt").read_bytes() == b"one"
    (tmp_path / "dl" / "pkg.zip").unlink()  # the archive may be deleted once extracted
    n = len(server.requests)
    assert fetch_and_extract(server.url("pkg.zip"), md5(data), tmp_path / "dl", progress=False) == out
    assert len(server.requests) == n
    # Another archive version (other checksum): extracted again.
    data2 = _zip(tmp_path / "src2.zip", [("d/a.txt", b"two")]).read_bytes()
    server.files["pkg.zip"] = data2
    out = fetch_and_extract(server.url("pkg.zip"), md5(data2), tmp_path / "dl", progress=False)
    assert (out / "d/a.txt").read_bytes() == b"two"
