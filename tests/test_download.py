"""Downloads (Range resume, checksums) and safe extraction, against a loopback HTTP server.

`LoopbackServer` is also used by test_voc12.py and test_coco14.py (loaded from this file by path).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import struct
import tarfile
import threading
import time
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
    """Serves `files` on 127.0.0.1 with Range support; `cut[path] = n` cuts the next reply after n bytes.

    `stall[path] = (n, seconds)`: the next reply sends n bytes, then nothing for `seconds`, then closes.
    `reset[path] = n`: the next reply sends n bytes, waits a moment, then resets the connection (RST).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.stall: dict[str, tuple[int, float]] = {}
        self.reset: dict[str, int] = {}
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
                stall, reset = server.stall.pop(path, None), server.reset.pop(path, None)
                if stall is not None:
                    body = body[:stall[0]]
                if reset is not None:
                    body = body[:reset]
                self.wfile.write(body)
                self.wfile.flush()
                server.sent.append(len(body))
                self.close_connection = True
                if stall is not None:
                    time.sleep(stall[1])
                if reset is not None:
                    time.sleep(0.3)  # the client has read what was sent before the reset comes
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

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
        download(server.url("f.tar"), tmp_path / "f.tar", wrong, progress=False, url_key="data.x.urls.y",
                 checksum_key="data.x.checksums.y")
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_names_the_checksum_key(server, tmp_path):
    server.files["f.tar"] = PAYLOAD
    with pytest.raises(ChecksumError) as err:
        download(server.url("f.tar"), tmp_path / "f.tar", "md5:" + "0" * 32, progress=False,
                 url_key="data.voc12.urls.voc", checksum_key="data.voc12.checksums.voc")
    assert "data.voc12.checksums.voc" in str(err.value) and "urls" not in str(err.value)


def test_stale_file_with_wrong_checksum_is_deleted_and_fetched_again(server, tmp_path):
    server.files["f.tar"] = PAYLOAD
    (tmp_path / "f.tar").write_bytes(b"not the archive")
    download(server.url("f.tar"), tmp_path / "f.tar", md5(PAYLOAD), progress=False)
    assert (tmp_path / "f.tar").read_bytes() == PAYLOAD
    assert server.requests == [("f.tar", None)]


def test_stale_file_is_deleted_even_when_the_host_is_unreachable(tmp_path):
    (tmp_path / "f.tar").write_bytes(b"not the archive")
    with pytest.raises(DownloadError, match="data.x.urls.y"):
        download("http://127.0.0.1:9/f.tar", tmp_path / "f.tar", md5(PAYLOAD), progress=False, retries=0,
                 url_key="data.x.urls.y")
    assert not (tmp_path / "f.tar").exists()


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
                 retry_wait=0, url_key="data.voc12.urls.voc")
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
    ([("hard", "lnk", "../outside")], r"hard link 'hard' -> '\.\./outside' leaves the target folder"),
    ([("d/hard", "lnk", "/etc/passwd")], r"hard link 'd/hard' -> '/etc/passwd' leaves the target folder"),
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


BIG = bytes(range(256)) * 8760  # 2,242,560 bytes, the size in the report of the lost chunk


def test_stalled_download_keeps_the_bytes_that_arrived(server, tmp_path):
    server.files["big.tar"] = BIG
    server.stall["big.tar"] = (400_000, 2.0)
    with pytest.raises(DownloadError, match=r"stopped after 400000 of 2242560 bytes.*rerun to resume"):
        download(server.url("big.tar"), tmp_path / "big.tar", md5(BIG), progress=False, retries=0,
                 timeout=0.5)
    assert (tmp_path / "big.tar.part").read_bytes() == BIG[:400_000]
    download(server.url("big.tar"), tmp_path / "big.tar", md5(BIG), progress=False, retries=0)
    assert (tmp_path / "big.tar").read_bytes() == BIG
    assert server.requests[-1] == ("big.tar", "bytes=400000-")


def test_reset_connection_keeps_the_bytes_and_resumes_in_the_same_call(server, tmp_path):
    server.files["big.tar"] = BIG
    server.reset["big.tar"] = 300_000
    download(server.url("big.tar"), tmp_path / "big.tar", md5(BIG), progress=False, retries=1, retry_wait=0)
    assert (tmp_path / "big.tar").read_bytes() == BIG
    assert [r for _, r in server.requests] == [None, "bytes=300000-"]
    assert server.sent == [300_000, len(BIG) - 300_000]


def _marked(tmp_path: Path, server, checksum_in_marker: str | None = None) -> tuple[Path, bytes]:
    """An extraction made by fetch_and_extract; its marker's checksum replaced when one is given."""
    data = _zip(tmp_path / "src.zip", [("d/a.txt", b"one")]).read_bytes()
    server.files["pkg.zip"] = data
    out = fetch_and_extract(server.url("pkg.zip"), md5(data), tmp_path / "dl", progress=False)
    if checksum_in_marker is not None:
        (out / ".cpal-extracted.json").write_text(json.dumps({"archive": "pkg.zip", "checksum": checksum_in_marker}))
    return out, data


@pytest.mark.parametrize("written", ["upper", "bare", "bare upper"])
def test_same_digest_written_otherwise_reuses_the_extraction(server, tmp_path, written):
    out, data = _marked(tmp_path, server)
    digest = hashlib.md5(data).hexdigest()
    spec = {"upper": "MD5:" + digest.upper(), "bare": digest, "bare upper": digest.upper()}[written]
    (tmp_path / "dl" / "pkg.zip").unlink()  # the docs allow deleting the archive once extracted
    (out / "d" / "mine.txt").write_text("kept")
    n = len(server.requests)
    assert fetch_and_extract("http://127.0.0.1:9/pkg.zip", spec, tmp_path / "dl", progress=False) == out
    assert (out / "d" / "mine.txt").read_text() == "kept" and len(server.requests) == n


def test_new_checksum_with_unreachable_host_keeps_the_old_extraction(server, tmp_path):
    out, data = _marked(tmp_path, server, md5(b"x"))  # as if extracted from an older archive version
    (tmp_path / "dl" / "pkg.zip").unlink()
    with pytest.raises(DownloadError, match=r"was kept"):
        fetch_and_extract("http://127.0.0.1:9/pkg.zip", md5(data), tmp_path / "dl", progress=False, retries=0)
    assert (out / "d/a.txt").read_bytes() == b"one"


def test_new_archive_failing_its_checksum_keeps_the_old_extraction(server, tmp_path):
    out, data = _marked(tmp_path, server, md5(b"x"))
    (tmp_path / "dl" / "pkg.zip").unlink()
    with pytest.raises(ChecksumError, match=r"data\.z\.checksums\.pkg.*was kept"):
        fetch_and_extract(server.url("pkg.zip"), "md5:" + "0" * 32, tmp_path / "dl", progress=False,
                          checksum_key="data.z.checksums.pkg")
    assert (out / "d/a.txt").read_bytes() == b"one"
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["extracted"]  # bad download deleted
    assert sorted(p.name for p in (tmp_path / "dl" / "extracted").iterdir()) == ["pkg"]


def test_stale_archive_failing_its_checksum_is_replaced_then_extracted(server, tmp_path):
    out, data = _marked(tmp_path, server, md5(b"x"))
    new = _zip(tmp_path / "new.zip", [("d/a.txt", b"two")]).read_bytes()
    server.files["pkg.zip"] = new  # dl/pkg.zip still holds the old version: it fails the new checksum
    assert fetch_and_extract(server.url("pkg.zip"), md5(new), tmp_path / "dl", progress=False) == out
    assert (out / "d/a.txt").read_bytes() == b"two"
    assert (tmp_path / "dl" / "pkg.zip").read_bytes() == new
    assert [p.name for p in (tmp_path / "dl" / "extracted").iterdir()] == ["pkg"]  # no staging leftovers


def test_errors_show_paths_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tar(Path("bad.tar"), [("hard", "lnk", "../../outside")])
    with pytest.raises(ArchiveError) as err:
        safe_extract("bad.tar", "dl/out", progress=False)
    assert str(err.value).startswith("bad.tar: hard link 'hard'") and os.sep + "tmp" not in str(err.value)
