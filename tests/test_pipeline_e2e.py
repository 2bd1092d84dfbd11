"""End to end on the tiny preset: the whole DAG through Snakemake and through DVC, for real."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from folder_workspace import export_folder
from pipeline_workspace import copy_workspace, engine_env, run_in, tiny_workspace

ROOT = Path(__file__).resolve().parents[1]
# Outputs that must not depend on the engine (timings and machine-stamped figures excluded).
COMPARED = [
    "results/eval_seeds.json", "results/eval_seeds_curve.csv", "outputs/train_cls/metrics.json",
    "results/eval_crf.json", "results/eval_irn.json", "results/eval_pseudo.json", "outputs/seg/metrics.json",
    "results/eval_seg.json", "results/eval_seg_full.json",
    "outputs/amn/metrics.json", "results/eval_amn_seeds.json", "results/eval_amn_crf.json", "results/eval_amn_irn.json",
]
# Every job's log (outputs/logs/<name>.log): a rule with a wildcard logs each of its jobs under its own name.
LOGS = ["data", "train_cls", "make_seeds", "eval_seeds", "refine_crf", "eval_crf", "ir_labels", "train_irn",
        "refine_irn", "eval_irn", "pseudo_labels", "eval_pseudo",
        "train_seg", "eval_seg", "train_seg_full", "eval_seg_full", "report",
        "train_amn", "make_amn_seeds", "eval_amn_seeds", "refine_amn_crf", "eval_amn_crf",
        "amn_ir_labels", "train_amn_irn", "refine_amn_irn", "eval_amn_irn"]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return engine_env()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_in(cwd, cmd)


@pytest.fixture(scope="module")
def snakemake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tiny_workspace(tmp_path_factory.mktemp("smk") / "ws")
    _run([sys.executable, "-m", "snakemake", "--cores", "2", "all", "results/eval_irn.json",  # + the IRN branch
          "results/eval_amn_seeds.json", "results/eval_amn_crf.json", "results/eval_amn_irn.json"], ws)  # + AMN
    return ws


@pytest.fixture(scope="module")
def dvc_run(tmp_path_factory: pytest.TempPathFactory, dvc_pair: dict) -> Path:
    """The session's `dvc repro` of the default DAG (tests/conftest.py), copied, then the branches on request."""
    ws = copy_workspace(dvc_pair["second"], tmp_path_factory.mktemp("dvc") / "ws")
    _run([sys.executable, "-m", "dvc", "repro", "-q", "hosts/dvc.yaml:eval_pseudo@irn"], ws)  # IRN, on request
    _run([sys.executable, "-m", "dvc", "repro", "-q", "--glob", "hosts/dvc.yaml:*amn*"], ws)  # AMN, on request
    return ws


def test_snakemake_runs_every_stage(snakemake_run: Path) -> None:
    for path in COMPARED + ["results/dataset_samples.png", "results/eval_seeds_curve.png", "results/report.md",
                            "results/report.csv", "results/report_per_class.png", "results/report_grid.png",
                            "results/gallery.html",
                            "outputs/train_cls/model.pt", "outputs/seeds/timing.json"]:
        assert (snakemake_run / path).is_file(), path
    for log in LOGS:
        assert (snakemake_run / "outputs" / "logs" / f"{log}.log").stat().st_size > 0
    metrics = json.loads((snakemake_run / "results" / "eval_seeds.json").read_text())
    assert 0 < metrics["cam"]["miou"] <= 1 and 0 < metrics["pacam"]["miou"] <= 1
    for name in ("eval_crf", "eval_irn", "eval_pseudo", "eval_seg", "eval_seg_full", "eval_amn_crf", "eval_amn_irn"):
        result = json.loads((snakemake_run / "results" / f"{name}.json").read_text())
        assert 0 < result["miou"] <= 1, name


def test_gallery_and_snakemake_report(snakemake_run: Path, tmp_path: Path) -> None:
    """The report stage's gallery page (self-contained, report.gallery_images rows) and Snakemake's own report
    of the outputs the Snakefile marks with report()."""
    import re

    import yaml

    page = (snakemake_run / "results" / "gallery.html").read_text()
    shown = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["report"]["gallery_images"]
    assert page.count('<tr class="row">') == shown
    assert re.findall(r'src="([^"]*)"', page) and not re.search(r'src="(?!data:)|https?://|<script', page)
    out = tmp_path / "snakemake report.html"
    _run([sys.executable, "-m", "snakemake", "--report", str(out)], snakemake_run)
    text = out.read_text()
    for name in ("gallery.html", "report_per_class.png", "report_grid.png", "eval_seeds_curve.png"):
        assert name in text, name


def test_snakemake_and_dvc_give_identical_metrics(snakemake_run: Path, dvc_run: Path) -> None:
    for path in COMPARED:
        assert (snakemake_run / path).read_bytes() == (dvc_run / path).read_bytes(), path


def test_second_dvc_repro_does_nothing_fast(dvc_run: Path) -> None:
    start = time.perf_counter()
    res = _run([sys.executable, "-m", "dvc", "repro"], dvc_run)
    assert time.perf_counter() - start < 10
    assert "didn't change, skipping" in res.stdout or "up to date" in res.stdout.lower()
    assert "Running stage" not in res.stdout


def test_second_snakemake_run_does_nothing(snakemake_run: Path) -> None:
    res = _run([sys.executable, "-m", "snakemake", "--cores", "2"], snakemake_run)
    assert "Nothing to be done" in res.stdout + res.stderr


def test_snakemake_rejects_bad_override(snakemake_run: Path, tmp_path: Path) -> None:
    override = tmp_path / "bad.yaml"
    override.write_text("params:\n  K: 0\n")
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(override)],
                         cwd=snakemake_run, env=_env(), capture_output=True, text=True)
    assert res.returncode != 0
    assert "K" in res.stdout + res.stderr and "minimum" in res.stdout + res.stderr


def test_snakemake_override_reaches_the_stages(snakemake_run: Path, tmp_path: Path) -> None:
    override = tmp_path / "k.yaml"
    override.write_text("params:\n  K: 2\n")
    res = _run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--configfile", str(override)],
               snakemake_run)
    written = (snakemake_run / "outputs" / "params.snakemake.yaml").read_text()
    assert "K: 2" in written
    # only the stages that read the changed section rerun
    assert "rule train_cls" in res.stdout and "rule data:" not in res.stdout


# ----------------------------------------------------------------------------------------------
# Your own data (data.source: folder)


def _my_config(ws: Path, folder: dict) -> Path:
    """What README's "Your own data" has a user write: configs/folder_example.yaml's data section with their
    paths and classes, and its thresholds (merged over the workspace's tiny params.yaml by --configfile)."""
    example = yaml.safe_load((ws / "configs" / "folder_example.yaml").read_text())
    data = {**example["data"], "folder": {**example["data"]["folder"],
                                          **{k: folder[k] for k in ("images", "labels", "classes", "masks")}}}
    override = {"data": data, "crf": {"bg_threshold": example["crf"]["bg_threshold"]},
                "pseudo": {"bg_threshold": example["pseudo"]["bg_threshold"]}}
    path = ws / "my.yaml"
    path.write_text(yaml.safe_dump(override, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def own_photos_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A new user's run: nested albums, odd names, mixed modes, a tags CSV without split column, no masks."""
    base = tmp_path_factory.mktemp("own")
    ws = tiny_workspace(base / "ws")
    folder = export_folder(tiny_data, base / "user", mixed=True, masks=False, split_column=False)
    unlisted = (tiny_data / "JPEGImages" / "val_000000.jpg").read_bytes()
    (Path(folder["images"]) / "not in the CSV.jpg").write_bytes(unlisted)
    _run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(_my_config(ws, folder))], ws)
    return ws


def test_own_photos_without_masks_run_to_a_trained_deeplab(own_photos_run: Path) -> None:
    ws = own_photos_run
    meta = json.loads((ws / "data" / "folder" / "dataset.json").read_text())
    assert meta["ground_truth"] == {"train": False, "val": False} and meta["resized"] == 1
    assert "1 image(s) in" in (ws / "outputs" / "logs" / "data.log").read_text()  # the unlisted photo, warned
    ids = (ws / "data" / "folder" / "image_ids.csv").read_text()
    assert "Ünïcödé Album/фото/IMG 0000, train_000000 ü.png" in ids  # every id traces back to the user's file
    seg = json.loads((ws / "outputs" / "seg" / "metrics.json").read_text())
    assert seg["steps"] > 0 and (ws / "outputs" / "seg" / "model.pt").stat().st_size > 1_000_000
    assert not (ws / "results" / "eval_irn.json").exists()  # the IRN branch is off the default path
    for name in ("eval_seeds", "eval_crf", "eval_pseudo", "eval_seg", "eval_seg_full"):
        result = json.loads((ws / "results" / f"{name}.json").read_text())
        assert result["ground_truth"] is False and result["miou"] is None, name
    seeds = json.loads((ws / "results" / "eval_seeds.json").read_text())
    crf_log = (ws / "outputs" / "logs" / "refine_crf.log").read_text()
    assert f"crf background plane {seeds['pacam']['otsu_threshold']:.4f}" in crf_log  # derived, no ground truth
    skipped = json.loads((ws / "results" / "eval_seg_full.json").read_text())["skipped"]
    assert "upper bound not trained" in skipped
    report = (ws / "results" / "report.md").read_text()
    assert "| DeepLab | val | no ground truth |" in report and "| upper bound | val | skipped |" in report
    assert "**No ground truth.**" in report and (ws / "results" / "report_grid.png").stat().st_size > 0


def test_dvc_skips_the_upper_bound_the_same_way(own_photos_run: Path) -> None:
    """Both engines run the same command, so DVC records the same skip (params.yaml = what Snakemake ran)."""
    ws = own_photos_run
    written = {p: (ws / p).read_bytes() for p in ("outputs/seg_full/metrics.json", "results/eval_seg_full.json")}
    (ws / "params.yaml").write_text((ws / "outputs" / "params.snakemake.yaml").read_text())
    for p in written:
        (ws / p).unlink()
    _run([sys.executable, "-m", "dvc", "repro", "-q", "-s", "train_seg@seg_full"], ws)
    _run([sys.executable, "-m", "dvc", "repro", "-q", "-s", "eval_seg@seg_full"], ws)
    for p, before in written.items():
        assert (ws / p).read_bytes() == before, p


@pytest.fixture(scope="module")
def folder_with_masks_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """The tiny embedded dataset exported as a photo folder + CSV + masks, run to the pseudo-masks."""
    base = tmp_path_factory.mktemp("folder_gt")
    ws = tiny_workspace(base / "ws")
    folder = export_folder(tiny_data, base / "user", mixed=False, masks=True, split_column=True)
    override = {"data": {"source": "folder", "dir": "data/folder",
                         "folder": {k: folder[k] for k in ("images", "labels", "classes", "masks")}}}
    (ws / "my.yaml").write_text(yaml.safe_dump(override, allow_unicode=True))
    _run([sys.executable, "-m", "snakemake", "--cores", "2", "results/eval_seeds.json", "results/eval_crf.json",
          "results/eval_pseudo.json", "--configfile", "my.yaml"], ws)  # targets first: --configfile takes a list
    return ws


def test_folder_source_gives_the_embedded_numbers(folder_with_masks_run: Path, snakemake_run: Path) -> None:
    """The same images and masks through the folder source and the embedded source: identical evaluations."""
    for name in ("eval_seeds.json", "eval_crf.json", "eval_pseudo.json"):
        ours, theirs = (json.loads((w / "results" / name).read_text()) for w in (folder_with_masks_run, snakemake_run))
        assert ours == theirs, name
    assert json.loads((folder_with_masks_run / "results" / "eval_crf.json").read_text())["miou"] > 0


def test_dvc_experiment_then_compare(dvc_run: Path, tmp_path: Path) -> None:
    """Last in this file: `dvc exp run` applies its results to the shared workspace."""
    import pandas as pd

    _run([sys.executable, "-m", "dvc", "exp", "run", "-q", "-n", "k1", "-S", "params.K=1",
          "hosts/dvc.yaml:eval_seeds@cls"], dvc_run)
    out = tmp_path / "experiments"
    _run([sys.executable, "-m", "cpal.report.compare", "--out", str(out)], dvc_run)
    table = pd.read_csv(out.with_suffix(".csv"))
    row = table[table["experiment"] == "k1"].iloc[0]
    assert row["params.K"] == 1 and 0 < row["seeds_pacam"] <= 100
    # eval_seg was not among the targets: no DeepLab number may be reported for K=1 (the experiment either
    # does not carry the workspace's K=5 file, or carries it and compare marks it stale)
    assert pd.isna(row["deeplab"])
    assert pd.isna(row["stale"]) or "deeplab" in row["stale"] or row["stale"] == ""
    assert "| k1 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
