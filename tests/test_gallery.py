"""results/gallery.html: one self-contained page, written by the report stage, honest about missing masks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cpal.core.io import save_label_png
from cpal.core.training import save_checkpoint
from cpal.data.voc import VOCDataset
from cpal.report.gallery import Panels, gallery_html
from cpal.seeds.store import BACKGROUND_KEY, save_seeds, seed_path
from cpal.seg.model import build_segmenter
from cpal.seg.train import seg_meta


def _self_contained(page: str) -> None:
    """No fetch of anything: every picture a data URI, no script, no stylesheet link, no web address."""
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r"https?://|<script|<link|url\(", page)


def test_gallery_html_rows_legend_scores_and_no_ground_truth() -> None:
    rng = np.random.default_rng(0)
    classes = ["background", "boat", "water lily"]
    gt = rng.integers(0, 3, (16, 20)).astype(np.uint8)
    image = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    panels = [Panels("img 1 <b>", image, gt, gt, gt, gt, gt, (2,)),
              Panels("img_2", image, None, gt, gt, np.zeros_like(gt), gt)]
    page = gallery_html(panels, classes, "a title", "a note")
    _self_contained(page)
    assert page.count('<tr class="row">') == 2
    assert "img 1 &lt;b&gt;" in page and "water lily" in page  # names escaped, class names shown
    assert "tags: water lily" in page and "tags: none" in page
    assert "DeepLab mIoU 100.0%" in page and "pseudo-mask mIoU 100.0%" in page  # prediction = ground truth
    assert page.count("no ground truth") == 2  # the second row: its info cell and its ground-truth cell
    assert page.count("data:image/") == 2 * 6 - 1


@pytest.fixture
def fake_run(tmp_path: Path, tiny_data: Path, tiny_params: dict) -> dict[str, Path]:
    """What the report stage reads, made by hand: seeds, pseudo-masks, a DeepLab checkpoint, eval JSONs; the
    mask of the second image removed (data without ground truth)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    split = tiny_params["seeds"]["split"]
    dataset = VOCDataset(data, split)
    rng = np.random.default_rng(0)
    seeds, pseudo = tmp_path / "seeds", tmp_path / "pseudo"
    for image_id in dataset.ids[:6]:
        keys = dataset.labels(image_id)
        h, w = dataset.image_size(image_id)
        maps = {"cam": rng.random((len(keys), h, w)), "pacam": rng.random((len(keys), h, w)),
                BACKGROUND_KEY: rng.random((h, w))}
        save_seeds(seed_path(seeds, image_id), keys, (h, w), maps)
        save_label_png(pseudo / f"{image_id}.png", dataset.mask(image_id))
    dataset.mask_path(dataset.ids[1]).unlink()
    cfg = tiny_params["seg"]
    torch.manual_seed(0)
    model = build_segmenter({**cfg, "init": "none"}, dataset.num_classes)
    save_checkpoint(tmp_path / "seg.pt", {"model": model.state_dict(), "meta": seg_meta(cfg, dataset.classes, "x")})
    results = tmp_path / "results"
    results.mkdir()
    per_class = {c: 0.5 for c in dataset.classes}
    seeds_eval = {k: {"miou": 0.4, "best_threshold": 0.3, "per_class_iou": per_class} for k in ("cam", "pacam")}
    (results / "eval_seeds.json").write_text(json.dumps(seeds_eval))
    (results / "eval_seg.json").write_text(json.dumps({"miou": 0.3, "per_class_iou": per_class, "crf": None}))
    params = yaml.safe_load(yaml.safe_dump(tiny_params))
    params["report"]["gallery_images"] = 5
    params["run"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return {"data": data, "seeds": seeds, "pseudo": pseudo, "seg": tmp_path / "seg.pt", "results": results,
            "params": tmp_path / "params.yaml", "ids": dataset.ids[:5]}


def test_report_stage_writes_the_gallery(fake_run: dict, tmp_path: Path) -> None:
    from stages.report import main

    r = fake_run
    gallery = r["results"] / "gallery.html"
    assert main(["--params", str(r["params"]), "--data", str(r["data"]), "--results", str(r["results"]),
                 "--logs", str(tmp_path / "logs"), "--seeds", str(r["seeds"]), "--pseudo", str(r["pseudo"]),
                 "--seg", str(r["seg"]), "--out", str(r["results"] / "report.md"), "--gallery", str(gallery)]) == 0
    page = gallery.read_text()
    _self_contained(page)
    rows = page.split('<tr class="row">')[1:]
    assert len(rows) == 5  # report.gallery_images
    for image_id, row in zip(r["ids"], rows, strict=True):
        assert f"<b>{image_id}</b>" in row
        assert ("no ground truth" in row) == (image_id == r["ids"][1])
        assert ("DeepLab mIoU" in row) == (image_id != r["ids"][1])
    assert "boat" in page and "cat" in page  # the embedded dataset's classes in the legend
    assert (r["results"] / "report_grid.png").stat().st_size > 0
