"""File helpers shared by every stage: atomic writes, staged output folders and VOC palette PNGs.

Every artifact is written to a temporary name in the same folder and renamed into place, so a killed
stage never leaves a half-written file that a rerun would accept. Stages that write a folder of
per-image files build it in a hidden sibling (``.<name>.partial``) and rename it into place only when
every file is there, so a killed stage never leaves a folder that looks complete. The partial folder
records a fingerprint of its inputs and settings; a rerun with the same fingerprint keeps the files
already written and does the rest (a rerun with another fingerprint, or of a stage that does not
resume, starts from an empty one: nothing a killed run left is ever kept by mistake).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are meant to be shared
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


STAMP = ".fingerprint"


def inputs_stamp(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of input files: a cheap proxy for their content in a fingerprint."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return out


def partial_folder(final: str | os.PathLike[str], fingerprint: str | None) -> Path:
    """The staging folder for `final`, emptied unless it was started with this fingerprint (None: always).

    Temporary files a killed write left (atomic_path names) are removed, so they are never published.
    """
    final = Path(final)
    partial = final.parent / f".{final.name}.partial"
    stamp = partial / STAMP
    if partial.exists() and (fingerprint is None or not stamp.is_file() or stamp.read_text() != fingerprint):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    partial.chmod(0o777 & ~_umask())
    for stale in partial.glob(".*.tmp*"):
        stale.unlink()
    if fingerprint is not None and not stamp.is_file():
        write_text(stamp, fingerprint)
    return partial


def publish_folder(partial: Path, final: str | os.PathLike[str]) -> None:
    """Move the finished staging folder to `final`, replacing an older output of this stage."""
    final = Path(final)
    (partial / STAMP).unlink(missing_ok=True)
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike[str]) -> Iterator[Path]:
    """An empty staging folder for `final` (no resume); published if the block succeeds, else removed."""
    partial = partial_folder(final, None)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish_folder(partial, final)


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent) so identical results give identical bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class JsonMapWriter:
    """A JSON object written entry by entry, byte-identical to ``write_json`` of the whole dict: a dataset of
    10,000 images need not hold every image's record in memory to write one file. Keys must come in sorted
    order (write_json sorts them); the file appears at ``path`` only on a clean exit (atomic_path)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.last: str | None = None
        self.count = 0

    def __enter__(self) -> JsonMapWriter:
        self._ctx = atomic_path(self.path)
        self._file = open(self._ctx.__enter__(), "w")  # noqa: SIM115 - closed in __exit__
        return self

    def add(self, key: str, value: Any) -> None:
        if self.last is not None and key <= self.last:
            raise ValueError(f"{self.path}: key {key!r} after {self.last!r}: keys must be added in sorted order")
        entry = json.dumps({key: value}, indent=2, sort_keys=True)[2:-2]  # '  "key": {...}' without the braces
        self._file.write(("{\n" if self.last is None else ",\n") + entry)
        self.last = key
        self.count += 1

    def __exit__(self, kind, value, tb) -> bool:
        self._file.write("{}\n" if self.last is None else "\n}\n")
        self._file.close()
        return bool(self._ctx.__exit__(kind, value, tb))


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: class i gets the colour the VOC devkit gives it; 255 is cream."""
    return _voc_palette(n).copy()


@functools.cache
def _voc_palette(n: int) -> np.ndarray:
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


@functools.cache
def _palette_bytes() -> bytes:
    return _voc_palette(256).tobytes()


def save_label_png(path: str | os.PathLike[str], label: np.ndarray) -> None:
    """Write a label map (uint8, class ids, 255 = ignore) as a VOC palette PNG, atomically."""
    if label.ndim != 2:
        raise ValueError(f"{path}: a label map must be 2-D, got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.min() < 0 or label.max() > 255:
            raise ValueError(f"{path}: label values must lie in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    img = Image.fromarray(label, mode="P")
    img.putpalette(_palette_bytes())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def load_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label PNG as its raw indices (palette images are not converted to colours)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise ValueError(f"{path}: a label PNG must be palette (P) or grayscale (L), got mode {img.mode}")
            return np.array(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: unreadable label PNG ({exc})") from exc


def save_jpeg(path: str | os.PathLike[str], image: np.ndarray, quality: int = 92) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image, mode="RGB").save(tmp, format="JPEG", quality=quality)
