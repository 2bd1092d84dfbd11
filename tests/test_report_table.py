"""The table run.sh prints at the end: read from the run's own results/report.csv."""

from __future__ import annotations

from pathlib import Path

from cpal.report import summary as report


def test_terminal_table_shows_each_stage_in_percent(tmp_path: Path) -> None:
    csv = tmp_path / "report.csv"
    csv.write_text("stage,split,miou,seconds,voc_published,voc_source,of_upper_bound\n"
                   "CAM seeds,train,0.31771,87.00000,48.30000,\"IRN (CVPR 2019), VOC train\",\n"
                   "upper bound,val,0.32915,,76.35000,\"DeepLabV2, VOC val\",1.00000\n")
    lines = report.terminal_table(csv).splitlines()
    assert lines[0].split() == ["stage", "split", "mIoU", "(%)", "seconds"]
    assert lines[2].split() == ["CAM", "seeds", "train", "31.8", "87"]
    assert lines[3].split() == ["upper", "bound", "val", "32.9"]  # no log, no seconds


def test_main_prints_the_table_or_says_there_is_none(tmp_path: Path, capsys) -> None:
    assert report.main([str(tmp_path / "missing.csv")]) == 0
    assert "has not run" in capsys.readouterr().out
    reference = Path(__file__).resolve().parents[1] / "results" / "reference" / "report.csv"
    assert report.main([str(reference)]) == 0
    assert "PACAM seeds" in capsys.readouterr().out
