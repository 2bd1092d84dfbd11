"""cpal.core.io's staged folders: what a killed run leaves is never published, resumed only when it matches."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpal.core.io import partial_folder, publish_folder, staged_folder


def test_leftovers_of_a_killed_run_are_dropped(tmp_path: Path) -> None:
    final = tmp_path / "maps"
    partial = partial_folder(final, "fp-1")
    (partial / "a.png").write_bytes(b"done")
    (partial / ".b.png.x1.tmp.png").write_bytes(b"half")  # an interrupted atomic write
    again = partial_folder(final, "fp-1")  # same inputs: resume, minus the half-written file
    assert sorted(p.name for p in again.iterdir() if p.name != ".fingerprint") == ["a.png"]
    other = partial_folder(final, "fp-2")  # other inputs: start over
    assert [p.name for p in other.iterdir() if p.name != ".fingerprint"] == []
    (other / "c.png").write_bytes(b"c")
    publish_folder(other, final)
    assert [p.name for p in final.iterdir()] == ["c.png"]
    assert not other.exists()


def test_staged_folder_publishes_on_success_and_vanishes_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "out"
    stray = partial_folder(final, "from a killed run")
    (stray / "old.png").write_bytes(b"x")
    with pytest.raises(RuntimeError), staged_folder(final) as tmp:
        assert not (tmp / "old.png").exists()  # never resumes: starts empty
        (tmp / "x.png").write_bytes(b"x")
        raise RuntimeError("worker died")
    assert not final.exists() and not any(tmp_path.iterdir())
    with staged_folder(final) as tmp:
        (tmp / "y.png").write_bytes(b"y")
    assert [p.name for p in final.iterdir()] == ["y.png"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
