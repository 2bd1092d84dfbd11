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


def _eval(split: str, classes: list[str]) -> dict:
    return {"split": split, "miou": 0.5, "ground_truth": True, "per_class_iou": {c: 0.5 for c in sorted(classes)}}


VOC_ORDER = ["background", "aeroplane", "bicycle", "bird"]


def test_rows_carry_the_split_each_evaluation_recorded(tmp_path: Path) -> None:
    """VOC's seeds, CRF and pseudo-masks run on train_aug: the report says so, never a hard-coded 'train'."""
    import json

    res = tmp_path / "results"
    res.mkdir()
    seeds = {"split": "train_aug", "ground_truth": True, "cam": {"miou": 0.4, "per_class_iou": {"bird": 0.1}},
             "pacam": {"miou": 0.45, "per_class_iou": {"bird": 0.2}}}
    (res / "eval_seeds.json").write_text(json.dumps(seeds))
    for name in ("eval_crf", "eval_pseudo"):
        (res / f"{name}.json").write_text(json.dumps(_eval("train_aug", VOC_ORDER)))
    seg = {**_eval("val", VOC_ORDER), "crf": {"miou": 0.55, "per_class_iou": {c: 0.6 for c in VOC_ORDER}}}
    (res / "eval_seg.json").write_text(json.dumps(seg))
    (res / "eval_seg_full.json").write_text(json.dumps({**_eval("val", VOC_ORDER), "miou": 0.7}))
    rows = report.collect_rows(res, tmp_path / "logs", with_irn=False, classes=VOC_ORDER,
                               splits={"train": "unused", "val": "unused"})
    assert [(r["stage"], r["split"]) for r in rows] == [
        ("CAM seeds", "train_aug"), ("PACAM seeds", "train_aug"), ("+CRF", "train_aug"),
        ("pseudo-masks", "train_aug"), ("DeepLab", "val"), ("DeepLab+CRF", "val"), ("upper bound", "val")]
    assert [r["of_upper_bound"] is not None for r in rows] == [False] * 4 + [True] * 3
    # classes in the dataset's order, background first (the JSON files hold them sorted)
    assert list(rows[2]["per_class"]) == VOC_ORDER
    md = report.markdown(rows, "cpal", "a machine", "snakemake --cores 2 --configfile configs/voc12.yaml", "imagenet")
    assert "| +CRF | train_aug | 50.0 |" in md and "| train |" not in md
    assert "Reproduce: `snakemake --cores 2 --configfile configs/voc12.yaml`" in md
    table = md[md.index("Per-class IoU (%):"):].splitlines()
    assert table[2].startswith("| class | CAM seeds (train_aug) | PACAM seeds (train_aug) | +CRF (train_aug) |")
    assert [line.split(" | ")[0].lstrip("| ") for line in table[4:8]] == VOC_ORDER


def test_split_falls_back_to_the_params_for_files_without_one(tmp_path: Path) -> None:
    import json

    res = tmp_path / "results"
    res.mkdir()
    (res / "eval_crf.json").write_text(json.dumps({"miou": 0.5, "per_class_iou": {"b": 0.5, "a": 0.5}}))
    rows = report.collect_rows(res, tmp_path, classes=["a", "b"], splits={"train": "train_aug", "val": "val"})
    assert rows[0]["split"] == "train_aug" and list(rows[0]["per_class"]) == ["a", "b"]


def test_per_class_plot_keeps_background_first(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.axes

    seen = {}
    original = matplotlib.axes.Axes.set_xticks

    def spy(self, ticks, labels=None, **kw):
        seen["labels"] = list(labels) if labels is not None else None
        return original(self, ticks, labels, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks", spy)
    rows = [{"stage": "CAM seeds", "split": "train_aug", "per_class": report.ordered_per_class(
        {c: 0.5 for c in sorted(VOC_ORDER)}, VOC_ORDER)}]
    report.plot_per_class(rows, tmp_path / "bars.png", "footer")
    assert seen["labels"] == VOC_ORDER


def test_reproduce_command_names_what_ran(tmp_path: Path) -> None:
    """Snakemake's merged config names its configfiles; DVC's params.yaml is named as the preset it equals."""
    import shutil

    from cpal.core.config import load_params, write_resolved_params

    root = Path(__file__).resolve().parents[1]
    voc = load_params(root / "configs" / "voc12.yaml")
    merged = write_resolved_params(voc, str(tmp_path / "outputs" / "params.snakemake.yaml"),
                                   ["params.yaml", "configs/voc12.yaml"])
    assert load_params(merged) == voc  # the header line is a comment: stages read the same params
    assert report.reproduce_command(merged) == "snakemake --cores 2 --configfile configs/voc12.yaml"
    plain = write_resolved_params(voc, str(tmp_path / "plain.yaml"))
    assert report.reproduce_command(plain) == "snakemake --cores 2"
    presets = tmp_path / "configs"
    presets.mkdir()
    shutil.copy(root / "configs" / "voc12.yaml", presets / "voc12.yaml")
    shutil.copy(root / "configs" / "voc12.yaml", tmp_path / "params.yaml")
    assert report.reproduce_command(tmp_path / "params.yaml", presets) == \
        "cp configs/voc12.yaml params.yaml && dvc repro report"
    (tmp_path / "params.yaml").write_text((root / "params.yaml").read_text())
    assert report.reproduce_command(tmp_path / "params.yaml", presets) == "dvc repro report"


def test_every_published_number_names_a_source_a_reader_can_open() -> None:
    """A number is printed only with a table or a repository file behind it, and docs/published.md lists it."""
    import re

    docs = (Path(__file__).resolve().parents[1] / "docs" / "published.md").read_text()
    for stage, (number, source) in report.PUBLISHED_VOC.items():
        if number is None:
            continue
        assert re.search(r"Table \d|README", source), (stage, source)
        assert f"| {number:g} |" in docs or f"| {number:g} -> " in docs, (stage, number)
    assert report.PUBLISHED_VOC["PACAM seeds"][0] is None  # 62.5: only from a summary of the paper
