"""IRN (Ahn et al., CVPR 2019) for semantic pseudo-labels: inter-pixel relation labels from seeds, the
class-boundary branch on a frozen backbone, and the random walk that propagates seeds up to boundaries.

Stages that write a folder of per-image files build it in a hidden sibling (``.<name>.partial``) and
rename it into place only when every file is there, so a killed stage never leaves a folder that looks
complete. The partial folder records a fingerprint of its inputs and settings; a rerun with the same
fingerprint keeps the files already written (each was written atomically) and does the rest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cpal.io import write_text

STAMP = ".fingerprint"


def inputs_stamp(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of input files: a cheap proxy for their content in a fingerprint."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return out


def partial_folder(final: str | os.PathLike[str], fingerprint: str) -> Path:
    """The staging folder for `final`; emptied if it was started with another fingerprint."""
    final = Path(final)
    partial = final.parent / f".{final.name}.partial"
    stamp = partial / STAMP
    if partial.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
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
