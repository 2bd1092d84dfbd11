"""The real-data presets end to end: configs/voc12.yaml and configs/coco14.yaml through every stage of the default DAG
and of the IRN and AMN branches, on tiny VOC- and COCO-layout archives served on loopback (with the real quirks:
CMYK and grayscale JPEGs, palette PNGs, SBD-only ids, odd sizes, crowd regions).

The presets run as written except configs/overrides/cpu_trial.yaml (one epoch, 32 px crops, batches of 2: what a
CPU cannot afford) and the archive's own URLs and size. ImageNet weights are loaded as the presets ask, from
files placed in a temporary TORCH_HOME (random tensors of the right shapes): the offline route of
docs/real-data.md, with no network.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from pipeline_workspace import dvc_stages, run_in, tiny_workspace
from torchvision import models

from cpal.backbone import required_imagenet_weights, weights_path
from cpal.core.config import load_yaml, merge

ROOT = Path(__file__).resolve().parents[1]
TRIAL = "configs/overrides/cpu_trial.yaml"
BRANCH_TARGETS = ["results/eval_irn.json", "results/eval_amn_seeds.json", "results/eval_amn_crf.json",
                  "results/eval_amn_irn.json"]

pytestmark = pytest.mark.slow


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_cpal_presets_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _all_logs() -> set[str]:
    """The log of every job the pipeline has (outputs/logs/<name>.log; a foreach stage's items log apart)."""
    return {re.search(r"--log outputs/logs/(\w+)\.log", stage["cmd"])[1] for stage in dvc_stages().values()}


def _place_weights(params: dict, torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Random tensors of the right shapes where torchvision looks for every weights file ``params`` needs."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    placed = []
    for weights in required_imagenet_weights(params):
        name = next(n for n in models.list_models(module=models) if models.get_model_weights(n) is type(weights))
        path = weights_path(weights)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(models.get_model(name).state_dict(), path)
        placed.append(path.name)
    return placed


def _preset_run(tmp_path_factory: pytest.TempPathFactory, preset: str, data: dict) -> Path:
    """A workspace with params.yaml = the default, run with --configfile <preset> cpu_trial local.yaml."""
    base = tmp_path_factory.mktemp(preset)
    ws = tiny_workspace(base / "ws")
    (ws / "params.yaml").write_text((ROOT / "params.yaml").read_text())  # what a user's clone holds
    (ws / "local.yaml").write_text(yaml.safe_dump({"data": data}))
    params = merge(merge(load_yaml((ROOT / "configs" / f"{preset}.yaml").read_text()),
                         load_yaml((ROOT / TRIAL).read_text())), {"data": data})
    with pytest.MonkeyPatch.context() as mp:
        assert _place_weights(params, base / "torch_home", mp)
        run_in(ws, [sys.executable, "-m", "snakemake", "--cores", "2", "all", *BRANCH_TARGETS,
                    "--configfile", f"configs/{preset}.yaml", TRIAL, "local.yaml"])  # targets first
    return ws


@pytest.fixture(scope="module")
def voc12_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tv = _module("test_voc12")
    src = tmp_path_factory.mktemp("voc12_src")
    voc_src, sbd_src = tv.build_sources(src)
    voc_tar, sbd_tgz = tv.tar_bytes(voc_src, gz=False), tv.tar_bytes(sbd_src, gz=True)
    with tv.LoopbackServer() as srv:
        srv.files["pascal/VOCtrainval_11-May-2012.tar"] = voc_tar
        srv.files["sbd/benchmark.tgz"] = sbd_tgz
        data = {"voc12": {"download_dir": str(src / "downloads"), "retries": 0,
                          "urls": {"voc": srv.url("pascal/VOCtrainval_11-May-2012.tar"),
                                   "sbd": srv.url("sbd/benchmark.tgz")},
                          "checksums": {"voc": tv.md5(voc_tar), "sbd": tv.md5(sbd_tgz)},
                          "expected_train_aug": len(tv.TRAIN_AUG)}}
        return _preset_run(tmp_path_factory, "voc12", data)


@pytest.fixture(scope="module")
def coco14_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tc = _module("test_coco14")
    src = tmp_path_factory.mktemp("coco14_src")
    tree = tc.build_sources(src / "tree")
    archives = {"train": tc.zip_bytes(tree, "train2014"), "val": tc.zip_bytes(tree, "val2014"),
                "annotations": tc.zip_bytes(tree, "annotations")}
    names = {"train": "zips/train2014.zip", "val": "zips/val2014.zip",
             "annotations": "annotations/annotations_trainval2014.zip"}
    with tc.LoopbackServer() as srv:
        for key, blob in archives.items():
            srv.files[names[key]] = blob
        data = {"coco14": {"download_dir": str(src / "downloads"), "retries": 0,
                           "urls": {k: srv.url(v) for k, v in names.items()},
                           "checksums": {k: tc.md5(v) for k, v in archives.items()}}}
        return _preset_run(tmp_path_factory, "coco14", data)


def _check_run(ws: Path, train_split: str, classes_head: list[str], n_classes: int, preset: str) -> None:
    logs = ws / "outputs" / "logs"
    assert {p.stem for p in logs.glob("*.log")} == _all_logs()
    for log in logs.glob("*.log"):
        assert " finished " in log.read_text().splitlines()[-1], log.name
    meta = json.loads(next((ws / "data").glob("*/dataset.json")).read_text())
    assert meta["classes"][:len(classes_head)] == classes_head and len(meta["classes"]) == n_classes
    for name in ("eval_seeds", "eval_crf", "eval_pseudo", "eval_irn", "eval_amn_seeds", "eval_amn_crf",
                 "eval_amn_irn"):
        result = json.loads((ws / "results" / f"{name}.json").read_text())
        miou = result["cam"]["miou"] if name.endswith("seeds") else result["miou"]  # seeds: one entry per map
        assert result["split"] == train_split and 0 <= miou <= 1, name
    assert json.loads((ws / "results" / "eval_seg.json").read_text())["split"] == "val"

    report = (ws / "results" / "report.md").read_text()
    assert f"Reproduce: `snakemake --cores 2 --configfile configs/{preset}.yaml {TRIAL} local.yaml`" in report
    for stage in ("CAM seeds", "PACAM seeds", "+CRF", "pseudo-masks"):
        assert f"| {stage} | {train_split} |" in report, stage
    for stage in ("DeepLab", "DeepLab+CRF", "upper bound"):
        assert f"| {stage} | val |" in report, stage
    table = report[report.index("Per-class IoU (%):"):].split("\n\n")[1].splitlines()
    listed = [line.split(" | ")[0].lstrip("| ") for line in table[2:]]
    assert listed == [c for c in meta["classes"] if c in listed] and listed[0] == "background"
    csv_splits = [line.split(",")[1] for line in (ws / "results" / "report.csv").read_text().splitlines()[1:]]
    assert csv_splits[:2] == [train_split, train_split]


def test_voc12_preset_end_to_end(voc12_run: Path) -> None:
    """Every stage of the voc12 preset ran; the report says train_aug where it ran, background first."""
    _check_run(voc12_run, "train_aug", ["background", "aeroplane", "bicycle"], 21, "voc12")


def test_coco14_preset_end_to_end(coco14_run: Path) -> None:
    """The same for coco14: its train split, its 80 classes after background in COCO's order."""
    _check_run(coco14_run, "train", ["background", "person", "bicycle", "car"], 81, "coco14")
