"""The performance suite's own logic: the stage-log format it parses, overlap accounting, the naive loop."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from cpal.report.bench import stage_costs

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite():
    return load_benchmark("suite")


def test_covered_seconds_merges_overlaps(suite) -> None:
    assert suite.covered_seconds([]) == 0
    assert suite.covered_seconds([(0, 10), (5, 12), (20, 21)]) == pytest.approx(13)
    assert suite.covered_seconds([(3, 4), (0, 1)]) == pytest.approx(2)


def test_stage_log_line_is_parsed(suite, tmp_path: Path) -> None:
    """stages/common.py writes the last log line; the suite must read what it writes."""
    from cpal.core.runtime import setup_logging
    from stages.common import _finished

    logs = tmp_path / "logs"
    log = setup_logging(logs / "train_cls.log", "bench-test-stage")
    _finished(log, {"failed": False})
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)
    costs = stage_costs(logs)["train_cls"]
    assert costs["wall_s"] > 0 and costs["peak_rss_mib"] > 10
    assert costs["cuda_peak_mib"] is None  # only a process that used CUDA logs it (tests/gpu checks that one)
    (logs / "gpu.log").write_text("x INFO finished start=1.0 end=2.0 wall_s=1.0 peak_rss_mib=9 cuda_peak_mib=77\n")
    assert stage_costs(logs)["gpu"]["cuda_peak_mib"] == 77
    assert costs["end"] - costs["start"] == pytest.approx(costs["wall_s"], abs=0.01)


def test_naive_loop_gives_the_stage_maps(suite, tiny_params: dict, tiny_data: Path, tmp_path: Path) -> None:
    """The speed comparison is only fair at equal output."""
    from cpal.cls.train import build_model
    from cpal.data.voc import VOCDataset
    from cpal.seeds.make import make_seeds
    from cpal.seeds.store import load_seeds, seed_path

    torch.manual_seed(0)
    dataset = VOCDataset(tiny_data, "train")
    dataset.ids = dataset.ids[:4]
    model = build_model(tiny_params, dataset.num_classes - 1)
    from cpal.data.torch_data import to_tensor

    with torch.no_grad():  # one training-mode pass fills the support bank, so PACAM uses context
        images = torch.stack([to_tensor(dataset.image(i)) for i in dataset.ids])
        model.train()(images, torch.from_numpy(np.stack([dataset.multi_hot(i) for i in dataset.ids])))
    model.eval()
    assert int(model.bank.count.sum()) > 0
    cfg = dict(tiny_params["seeds"], batch_size=4)
    make_seeds(model, dataset, tmp_path, cfg, torch.device("cpu"), logging.getLogger("t"), progress=False)
    naive = suite.naive_seeds(model, dataset, cfg)
    for image_id, maps in naive.items():
        stored = load_seeds(seed_path(tmp_path, image_id))
        for kind, m in maps.items():
            assert np.abs(stored[kind].astype(np.float32) - m).max() < 2e-3, (image_id, kind)


def test_hotspots_name_the_heaviest_operator(suite) -> None:
    a = torch.randn(256, 256)
    ops = suite.hotspots(lambda: [torch.mm(a, a) for _ in range(3)] + [a.sum()], top=3)
    assert ops[0]["op"] == "aten::mm" and ops[0]["calls"] == 3
    assert 0 < sum(o["share"] for o in ops) <= 1.0 + 1e-9


def test_report_puts_the_earlier_run_beside_this_one(suite, tmp_path: Path) -> None:
    """--before: each goal's earlier value in its own column, and the earlier hotspots, from that JSON."""
    import copy
    import json

    now = json.loads((ROOT / "results" / "benchmarks.json").read_text())
    earlier = copy.deepcopy(now)
    earlier["parts"]["seeds"]["speedup"] = 0.5
    earlier["parts"]["hotspots"] = {"make_seeds (one batch)": [{"op": "aten::earlier_op", "self_ms": 1.0,
                                                                 "share": 0.5, "calls": 2}]}
    now["before"] = {k: earlier[k] for k in ("command", "date", "parts")}
    md = suite.markdown(now)
    row = next(line for line in md.splitlines() if line.startswith("| make_seeds batched vs naive loop"))
    assert row.split(" | ")[1].startswith("0.50x") and row.split(" | ")[2].startswith(
        f"{now['parts']['seeds']['speedup']:.2f}x")
    assert "## Hotspots before" in md and "aten::earlier_op" in md
    assert "aten::earlier_op" not in md.split("## Hotspots before")[0]
    # stages of an artifacts run, read from its logs
    logs = tmp_path / "outputs" / "logs"
    logs.mkdir(parents=True)
    (logs / "train_cls.log").write_text("x INFO finished start=100.000 end=160.000 wall_s=60.000 peak_rss_mib=900\n")
    (logs / "make_seeds.log").write_text("x INFO finished start=150.000 end=200.000 wall_s=50.000 peak_rss_mib=800\n")
    now["artifact_stages"] = stage_costs(logs)
    md = suite.markdown(now)
    assert "| time covered by at least one stage | 100.0 | |" in md
    assert "the artifacts' own run: time its stages cover) | " in md and "| 100 s |" in md


def test_seg_step_times_a_step_and_restores_the_shortcut() -> None:
    """The step timer swaps ASPP-v2's branch for the full convolution only while it measures."""
    from cpal.backbone import ASPPv2

    before = ASPPv2.__dict__["_branch"]
    ms = load_benchmark("seg_step").step_ms(dilated=False, shortcut=False, batch=2, crop=32, repeats=1)
    assert ms > 0 and ASPPv2.__dict__["_branch"] is before


def test_scale_table_holds_each_stage_to_its_goals(tmp_path: Path) -> None:
    """benchmarks/scale.py: per-image seconds from the count each stage processes, the 10,000 / 1,000 ratios
    against 1.3x (time) and 1.5x (peak RSS, under 4 GB), and a truncated photo in an exported folder."""
    scale = load_benchmark("scale")
    rows = [{"images": n, "source": "embedded", "stage": stage, "count": n - n // 5, "seconds": sec,
             "peak_rss_mib": rss} for n, stage, sec, rss in [
                (1000, "make_seeds", 80.0, 1400.0), (10000, "make_seeds", 800.0, 1450.0),
                (1000, "eval_seeds", 8.0, 100.0), (10000, "eval_seeds", 200.0, 100.0),   # 2.5x slower per image
                (1000, "refine_crf", 16.0, 80.0), (10000, "refine_crf", 160.0, 130.0)]]  # 1.63x the memory
    df = scale.table(rows)
    assert df["seconds_per_image"].iloc[0] == pytest.approx(0.1)
    md = scale.markdown(df, ["python benchmarks/scale.py"], None)
    verdict = {line.split(" | ")[1]: line.rsplit(" | ", 1)[1] for line in md.splitlines()
               if line.startswith("| embedded")}
    assert verdict == {"make_seeds": "met |", "eval_seeds": "**NOT met** |", "refine_crf": "**NOT met** |"}

    data = tmp_path / "data"
    for split, ids in (("train", ["a", "b"]), ("val", ["c"])):
        (data / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (data / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (data / "JPEGImages").mkdir()
    for image_id in "abc":
        (data / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8" + bytes(300))
    (data / "cls_labels.json").write_text('{"a": [1], "b": [1, 2], "c": []}')
    folder = scale.export_folder(data, tmp_path / "user", ["background", "cat", "dog"], broken=True)
    lines = Path(folder["labels"]).read_text().splitlines()
    assert lines[:3] == ["image,labels,split", "train/a.jpg,cat,train", "train/b.jpg,cat;dog,train"]
    assert (tmp_path / "user" / "photos" / "train" / "b.jpg").stat().st_size == 100  # the truncated one
    assert (data / "JPEGImages" / "b.jpg").stat().st_size == 302  # the dataset's own file untouched
