"""The compare command's table: fresh metrics kept, stale ones (a stage the experiment didn't rerun) emptied."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from cpal import compare
from cpal.experiments import NOTES_MARKER, experiment_table, swept_params

BASE = {"params": {"K": 5, "bank_size": 100, "metric": "dot"}, "run": {"seed": 0}}
SEEDS = "results/eval_seeds.json"
SEG = "results/eval_seg.json"


def _rev(params: dict, cam: float, seg: float | None) -> dict:
    metrics = {SEEDS: {"data": {"cam": {"miou": cam}, "pacam": {"miou": cam + 0.01}}}}
    if seg is not None:
        metrics[SEG] = {"data": {"miou": seg}}
    return {"params": {"params.yaml": {"data": params}}, "metrics": metrics}


def _lock(params: dict, stages: dict[str, str]) -> dict:
    """dvc.lock with the given stage -> output path, each recorded with `params`."""
    return {"stages": {name: {"params": {"params.yaml": {"params": params["params"]}}, "outs": [{"path": path}]}
                       for name, path in stages.items()}}


def _exp_show() -> tuple[list[dict], dict[str, dict | None]]:
    k1 = copy.deepcopy(BASE)
    k1["params"]["K"] = 1
    cos = copy.deepcopy(BASE)
    cos["params"]["metric"] = "cos"
    show = [
        {"rev": "workspace", "data": _rev(BASE, 0.3, 0.2)},
        {"rev": "a" * 40, "name": "main", "data": _rev(BASE, 0.30, 0.20), "experiments": [
            {"name": "k1", "executor": {"state": "success"}, "revs": [{"rev": "b" * 40, "data": _rev(k1, 0.25, 0.20)}]},
            {"name": "cos", "executor": None, "revs": [{"rev": "c" * 40, "data": _rev(cos, 0.35, 0.22)}]},
            {"name": "queued", "executor": {"state": "queued"},
             "revs": [{"rev": "d" * 40, "data": _rev(BASE, 0.3, 0.2)}]},
        ]},
    ]
    locks = {
        "a" * 40: None,  # baseline without dvc.lock: its committed results are taken as they are
        "b" * 40: _lock(k1, {"eval_seeds": SEEDS, "eval_seg": "unrelated.json"}),  # eval_seg not rerun for K=1
        "c" * 40: _lock(cos, {"eval_seeds": SEEDS, "eval_seg": SEG}),
        "d" * 40: None,
    }
    return show, locks


def test_fresh_metrics_kept_and_stale_ones_emptied() -> None:
    show, locks = _exp_show()
    table = experiment_table(show, locks.get).set_index("experiment")
    assert table.loc["main", "seeds_cam"] == 30.0 and table.loc["main", "deeplab"] == 20.0
    assert table.loc["k1", "seeds_cam"] == 25.0
    assert pd.isna(table.loc["k1", "deeplab"]) and table.loc["k1", "stale"] == "deeplab"
    assert table.loc["cos", "deeplab"] == 22.0 and table.loc["cos", "stale"] == ""
    assert table.loc["k1", "changed"] == "params.K=1"
    assert table.loc["queued", "state"] == "queued"


def test_a_lock_recorded_with_other_params_is_stale() -> None:
    show, locks = _exp_show()
    locks["c" * 40] = _lock(BASE, {"eval_seeds": SEEDS, "eval_seg": SEG})  # recorded with metric dot
    table = experiment_table(show, locks.get).set_index("experiment")
    assert pd.isna(table.loc["cos", "seeds_cam"]) and "seeds_cam" in table.loc["cos", "stale"]


def test_swept_params_are_the_ones_that_differ() -> None:
    show, locks = _exp_show()
    assert swept_params(experiment_table(show, locks.get)) == ["params.K", "params.metric"]


def test_compare_writes_table_plot_and_keeps_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    show, locks = _exp_show()
    saved = tmp_path / "show.json"
    saved.write_text(json.dumps(show))
    monkeypatch.setattr(compare, "git_lock_reader", lambda repo: locks.get)
    out = tmp_path / "results" / "experiments"
    assert compare.main(["--json", str(saved), "--out", str(out), "--machine", "test box"]) == 0
    md = out.with_suffix(".md").read_text()
    assert "| k1 |" in md and "| queued |" not in md and "test box" in md
    assert out.with_suffix(".png").stat().st_size > 1000
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert set(csv["experiment"]) == {"main", "k1", "cos"}
    out.with_suffix(".md").write_text(md + "\nhand-written discussion\n")
    assert compare.main(["--json", str(saved), "--out", str(out), "--machine", "test box"]) == 0
    again = out.with_suffix(".md").read_text()
    assert again.count(NOTES_MARKER) == 1 and "hand-written discussion" in again
