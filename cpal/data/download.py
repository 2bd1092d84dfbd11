"""Fetching dataset archives: resumable HTTP downloads, checksum verification and safe extraction.

Real datasets arrive as multi-gigabyte archives from servers that drop connections. A download goes
into `<file>.part`, resumes with an HTTP Range request after an interruption (within one call, and
across calls), and becomes `<file>` only after its checksum matches. Extraction checks every member
(no absolute paths, no `..`, no links or symlinked folders that lead outside the target) and writes
into a temporary folder that is renamed into place only when the whole archive went through, so a
failure never leaves a half-made tree that a rerun would trust.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

_HASH_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
_CHUNK = 1 << 20
# Network reads return whatever has arrived, at most this much: a stall or a reset then loses nothing
# that came over the wire (a blocking read of 1 MiB would drop its partly filled buffer).
_NET_READ = 1 << 16
EXTRACTED_MARKER = ".cpal-extracted.json"


class DownloadError(RuntimeError):
    """A download failed (server error, interrupted transfer, bad URL)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ChecksumError(RuntimeError):
    """A file's digest differs from the one it must have."""


class ArchiveError(RuntimeError):
    """An archive is unreadable or holds a member that would be written outside its target folder."""


def parse_checksum(spec: str) -> tuple[str, str]:
    """Split `"md5:<hex>"` / `"sha256:<hex>"` (or bare hex, algorithm from its length) into (algo, hex)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"checksum must be a string like 'md5:<hex>' or 'sha256:<hex>', got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        algo, digest = spec.split(":", 1)
        algo = algo.lower()
    else:
        digest = spec
        algo = _HASH_LENGTHS.get(len(spec), "")
    digest = digest.lower()
    if algo not in hashlib.algorithms_guaranteed:
        raise ValueError(f"checksum {spec!r}: unknown algorithm {algo!r} (use md5, sha1, sha256 or sha512)")
    if not re.fullmatch(r"[0-9a-f]+", digest) or len(digest) != hashlib.new(algo).digest_size * 2:
        raise ValueError(f"checksum {spec!r}: not a valid {algo} hex digest")
    return algo, digest


def same_checksum(a: str | None, b: str | None) -> bool:
    """Whether two checksum specs name the same digest: `md5:ABC..`, `md5:abc..` and bare `abc..` agree."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return parse_checksum(a) == parse_checksum(b)
    except ValueError:  # a malformed spec (e.g. an old marker) equals only itself
        return a.strip() == b.strip()


def file_digest(path: str | os.PathLike[str], algo: str = "md5", progress: bool = False) -> str:
    """Hex digest of a file, read in chunks (archives are gigabytes)."""
    path = Path(path)
    h = hashlib.new(algo)
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"verifying {path.name}", disable=not progress, leave=False) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_file(path: str | os.PathLike[str], checksum: str | None, progress: bool = False) -> None:
    """Raise ChecksumError unless `path` has digest `checksum`; a None checksum is logged, not checked."""
    if checksum is None:
        log.warning("no checksum configured for %s: not verified", path)
        return
    algo, expected = parse_checksum(checksum)
    got = file_digest(path, algo, progress)
    if got != expected:
        raise ChecksumError(f"checksum mismatch for {path}: expected {algo}:{expected}, got {algo}:{got}")


def filename_from_url(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if not name:
        raise ValueError(f"cannot tell a file name from the URL {url!r}")
    return name


def download(url: str, dest: str | os.PathLike[str], checksum: str | None, *, progress: bool = True,
             timeout: float = 60.0, retries: int = 3, retry_wait: float = 2.0, url_key: str = "",
             checksum_key: str = "") -> Path:
    """Download `url` to `dest` unless a verified copy is there; resume from `dest.part` when one exists.

    `retries` is how many times an interrupted or failed transfer is resumed within this call; if they
    run out, the `.part` file stays so that the next call resumes it. A file whose checksum does not
    match is deleted (resuming it could never fix it): a stale `dest` is fetched again, a fresh download
    raises ChecksumError. `url_key` / `checksum_key` name the params keys that set the URL and the
    checksum, so that each error points at the one to fix.
    """
    dest = Path(dest)
    url_fix = f" (URL set by {url_key})" if url_key else ""
    sum_fix = f" (checksum set by {checksum_key})" if checksum_key else ""
    expected = parse_checksum(checksum) if checksum is not None else None  # bad spec: fail before fetching
    if dest.exists():
        try:
            verify_file(dest, checksum, progress)
            return dest
        except ChecksumError as exc:
            log.warning("%s; deleting it and downloading %s again%s", exc, url, sum_fix)
            dest.unlink()
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"cannot download {url!r}: only http and https URLs are supported{url_fix}",
                            retryable=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch_into(url, part, progress=progress, timeout=timeout)
            break
        except DownloadError as exc:
            if attempt >= retries or not exc.retryable:
                have = part.stat().st_size if part.exists() else 0
                keep = f"; {have} bytes are kept in {part}: rerun to resume" if have else ""
                raise DownloadError(f"{exc}{keep}{url_fix}") from None
            attempt += 1
            log.warning("%s; resuming (attempt %d of %d)", exc, attempt, retries)
            time.sleep(retry_wait * attempt)
    if expected is None:
        log.warning("no checksum configured for %s: not verified", dest)
    else:
        algo, digest = expected
        got = file_digest(part, algo, progress)
        if got != digest:
            part.unlink()
            raise ChecksumError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected {algo}:{digest}, got "
                f"{algo}:{got}; the download was deleted. Rerun to fetch it again; if it keeps failing, the "
                f"server's file or the configured checksum is wrong{sum_fix}")
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    """One HTTP request that appends to (Range) or rewrites `part`; DownloadError on any shortfall."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cpal-data/1 (python urllib)"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            # Range not satisfiable: the part file already holds everything; the checksum decides.
            return
        retryable = exc.code >= 500 or exc.code in (408, 429)
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}", retryable) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"download of {url} failed: {getattr(exc, 'reason', exc)}") from None
    with resp:
        total = None
        if start and resp.status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                raise DownloadError(f"download of {url}: server answered a resume request with an unexpected "
                                    f"Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:
            if start:
                log.info("%s does not support resuming; starting over", url)
            start, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        if total is None and length is not None:
            total = start + int(length)
        written = start
        error = None
        read = getattr(resp, "read1", resp.read)  # what has arrived, not a full buffer (see _NET_READ)
        with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                         desc=part.name[: -len(".part")], disable=not progress) as bar:
            try:
                while chunk := read(_NET_READ):
                    f.write(chunk)
                    f.flush()  # on disk before the next read, which may stall or fail
                    written += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                error = exc
        if error is not None or (total is not None and written < total):
            why = f": {error!r}" if error is not None else ""
            raise DownloadError(f"download of {url} stopped after {written} of {total or '?'} bytes{why}")


# ---------------------------------------------------------------------------------------------------
# Safe extraction


def _clean_member_name(archive: Path, name: str) -> str:
    """The member's relative path, or ArchiveError for absolute paths and `..` components."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract it")
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{archive}: member {name!r} contains '..'; refusing to extract this archive")
    return "/".join(parts)


def _inside(root: str, path: str) -> bool:
    return path == root or os.path.commonpath([root, path]) == root


def _check_target(archive: Path, root: str, name: str) -> Path:
    """Real path of where a member lands; error if an earlier symlink would redirect it outside `root`."""
    target = os.path.realpath(os.path.join(root, name))
    if not _inside(root, target):
        raise ArchiveError(f"{archive}: member {name!r} would be written outside the target folder "
                           "(through a symbolic link); refusing to extract this archive")
    return Path(target)


def _check_link(archive: Path, root: str, name: str, linkname: str, symbolic: bool) -> None:
    if os.path.isabs(linkname) or linkname.startswith("\\"):
        raise ArchiveError(f"{archive}: link {name!r} -> {linkname!r} points to an absolute path "
                           "(outside the target folder); refusing to extract this archive")
    if symbolic:
        parent = os.path.realpath(os.path.dirname(os.path.join(root, name)))
        dest = os.path.realpath(os.path.join(parent, linkname))
    else:
        dest = os.path.realpath(os.path.join(root, linkname))
    if not _inside(root, dest):
        raise ArchiveError(f"{archive}: link {name!r} -> {linkname!r} leaves the target folder; "
                           "refusing to extract this archive")


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str],
                 include: Callable[[str], bool] | None = None, progress: bool = True,
                 stamp: dict | None = None, replace: bool = False) -> Path:
    """Extract a tar (any compression) or zip archive into the new folder `dest`, all or nothing.

    Every member name is checked; `include(relative_name)` picks the members that are written (all when
    None). `stamp`, if given, is written as JSON to `dest/.cpal-extracted.json` before the final rename.
    On any error the partial folder is removed and `dest` is not created. With `replace`, an existing
    `dest` is swapped out only once the new tree is complete, so a failure leaves it as it was.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and not replace:
        raise FileExistsError(f"{dest} already exists; remove it before extracting {archive.name} again")
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        root = os.path.realpath(tmp)
        if tarfile.is_tarfile(archive):
            _extract_tar(archive, root, include, progress)
        elif zipfile.is_zipfile(archive):
            _extract_zip(archive, root, include, progress)
        else:
            raise ArchiveError(f"{archive} is neither a tar nor a zip archive (damaged or incomplete?)")
        if stamp is not None:
            Path(tmp, EXTRACTED_MARKER).write_text(json.dumps(stamp, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _extract_tar(archive: Path, root: str, include: Callable[[str], bool] | None, progress: bool) -> None:
    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, "r:*") as tar, tqdm(desc=f"extracting {archive.name}", unit=" files",
                                                         disable=not progress, leave=False) as bar:
            for member in tar:
                name = _clean_member_name(archive, member.name)
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise ArchiveError(f"{archive}: member {member.name!r} is a device or special file; "
                                       "refusing to extract this archive")
                if not name or (include is not None and not include(name)):
                    continue
                _check_target(archive, root, name)
                if member.issym():
                    link = member.linkname
                    _check_link(archive, root, name, link, symbolic=True)
                elif member.islnk():
                    link = _hard_link_target(archive, member.name, member.linkname)
                    _check_link(archive, root, name, link, symbolic=False)
                original = member.name
                member.name = name
                if member.islnk():
                    member.linkname = link
                try:
                    tar.extract(member, root, set_attrs=False, **extra)
                except getattr(tarfile, "FilterError", ()) as exc:
                    # its message shows the staging folder's absolute path: name the member instead
                    raise ArchiveError(f"{archive}: member {original!r} is refused by tarfile's data filter "
                                       f"({type(exc).__name__}); refusing to extract this archive") from None
                bar.update()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ArchiveError(f"{archive}: unreadable tar archive ({exc}); delete it and rerun") from None


def _hard_link_target(archive: Path, name: str, linkname: str) -> str:
    """A hard link's target as a member path; the error names the link itself, not only its target."""
    try:
        return _clean_member_name(archive, linkname)
    except ArchiveError:
        raise ArchiveError(f"{archive}: hard link {name!r} -> {linkname!r} leaves the target folder; "
                           "refusing to extract this archive") from None


def _extract_zip(archive: Path, root: str, include: Callable[[str], bool] | None, progress: bool) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            names = [_clean_member_name(archive, info.filename) for info in infos]  # check all first
            for info, name in tqdm(list(zip(infos, names, strict=True)), desc=f"extracting {archive.name}",
                                   unit=" files", disable=not progress, leave=False):
                if not name or (include is not None and not include(name)):
                    continue
                target = _check_target(archive, root, name)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    linkname = zf.read(info).decode("utf-8")
                    _check_link(archive, root, name, linkname, symbolic=True)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(linkname, target)
                elif info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as exc:
        raise ArchiveError(f"{archive}: unreadable zip archive ({exc}); delete it and rerun") from None


def archive_stem(name: str) -> str:
    for ext in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def fetch_and_extract(url: str, checksum: str | None, download_dir: str | os.PathLike[str], *,
                      include: Callable[[str], bool] | None = None, progress: bool = True,
                      timeout: float = 60.0, retries: int = 3, retry_wait: float = 2.0,
                      url_key: str = "", checksum_key: str = "") -> Path:
    """Download + verify + extract once: `<download_dir>/<file>` and `<download_dir>/extracted/<stem>/`.

    The extracted folder carries a marker naming the archive and checksum; a later call with the same
    digest (however it is written: case, `md5:` prefix) reuses it without touching the network (the
    archive itself may then be deleted to save disk). A marker with another digest means the folder is
    stale: it is rebuilt from the new archive and replaced only once that archive is verified and fully
    extracted, so an unreachable host or a bad download leaves the old folder in place.
    """
    download_dir = Path(download_dir)
    name = filename_from_url(url)
    dest = download_dir / "extracted" / archive_stem(name)
    marker = dest / EXTRACTED_MARKER
    if dest.exists():
        if not marker.is_file():
            raise ArchiveError(f"{dest} exists but was not made by this tool (no {EXTRACTED_MARKER}); "
                               "move it away or delete it and rerun")
        info = json.loads(marker.read_text())
        if info.get("archive") == name and same_checksum(info.get("checksum"), checksum):
            return dest
        log.warning("%s was extracted from another archive version (%s %s); extracting again, the old "
                    "folder stays until the new archive is verified and extracted", dest, info.get("archive"),
                    info.get("checksum"))
    try:
        path = download(url, download_dir / name, checksum, progress=progress, timeout=timeout,
                        retries=retries, retry_wait=retry_wait, url_key=url_key, checksum_key=checksum_key)
    except (DownloadError, ChecksumError) as exc:
        if dest.exists():
            raise type(exc)(f"{exc}; {dest} (from an earlier archive version) was kept") from None
        raise
    stamp = {"archive": name, "checksum": checksum}
    safe_extract(path, dest, include=include, progress=progress, stamp=stamp, replace=True)
    return dest
