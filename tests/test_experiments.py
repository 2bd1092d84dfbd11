"""The compare command's table: fresh metrics kept, stale ones (a stage the experiment didn't rerun) emptied."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from cpal.report import compare
from cpal.report.experiments import NOTES_MARKER, experiment_table, sort_rows, swept_params

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
    # the baseline commit has no dvc.lock: nothing vouches for its result files, so no number is shown
    assert pd.isna(table.loc["main (committed)", "seeds_cam"]) and pd.isna(table.loc["main (committed)", "deeplab"])
    assert table.loc["main (committed)", "stale"] == "seeds_cam, seeds_pacam, deeplab"
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


def test_a_lock_with_per_key_params_is_read_key_by_key() -> None:
    """Stages may declare single keys (dvc.lock records `params.K: 1`): fresh when each equals the experiment's."""
    show, locks = _exp_show()
    lock = locks["b" * 40]
    lock["stages"]["eval_seeds"]["params"]["params.yaml"] = {"params.K": 1, "params.metric": "dot"}
    assert experiment_table(show, locks.get).set_index("experiment").loc["k1", "seeds_cam"] == 25.0
    lock["stages"]["eval_seeds"]["params"]["params.yaml"] = {"params.K": 5}  # recorded with another K: stale
    assert pd.isna(experiment_table(show, locks.get).set_index("experiment").loc["k1", "seeds_cam"])
    lock["stages"]["eval_seeds"]["params"]["params.yaml"] = {"params.missing": None}  # a key the params lack
    assert pd.isna(experiment_table(show, locks.get).set_index("experiment").loc["k1", "seeds_cam"])


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
    assert set(csv["experiment"]) == {"main (committed)", "workspace", "k1", "cos"}
    out.with_suffix(".md").write_text(md + "\nhand-written discussion\n")
    assert compare.main(["--json", str(saved), "--out", str(out), "--machine", "test box"]) == 0
    again = out.with_suffix(".md").read_text()
    assert again.count(NOTES_MARKER) == 1 and "hand-written discussion" in again


# ---------------------------------------------------------------------------------------------------
# Freshness along the upstream chain of dvc.lock, and the baseline rows

PSEUDO, FULL = "results/eval_pseudo.json", "results/eval_seg_full.json"
# stage: (params sections it declares, deps produced by other stages, outs), as in dvc.yaml and hosts/dvc.yaml
PIPELINE = {
    "data": (("data",), (), ("data",)),
    "train_cls": (("params", "train_cls"), ("data",), ("outputs/train_cls/model.pt",)),
    "make_seeds": (("params", "train_cls", "seeds"), ("data", "outputs/train_cls/model.pt"), ("outputs/seeds/maps",)),
    "eval_seeds@cls": (("params", "seeds"), ("data", "outputs/seeds/maps"), (SEEDS,)),
    "pseudo_labels": (("params", "seeds"), ("data", "outputs/seeds/maps"), ("outputs/pseudo/labels",)),
    "eval_pseudo@pseudo": (("params", "seeds"), ("data", "outputs/pseudo/labels"), (PSEUDO,)),
    "train_seg@seg": (("data", "seg"), ("data", "outputs/pseudo/labels"), ("outputs/seg/model.pt",)),  # no `params`
    "eval_seg@seg": (("seg",), ("data", "outputs/seg/model.pt"), (SEG,)),
    "train_seg@seg_full": (("data", "seg"), ("data",), ("outputs/seg_full/model.pt",)),
    "eval_seg@seg_full": (("seg",), ("data", "outputs/seg_full/model.pt"), (FULL,)),
}
FULL_PARAMS = {**BASE, "data": {"seed": 0}, "train_cls": {"epochs": 10}, "seeds": {"scales": [1.0]},
               "seg": {"epochs": 5}}


def _repro(params: dict, targets: set[str] | None = None, lock: dict | None = None) -> dict:
    """The dvc.lock `dvc repro` leaves: the stages in `targets` (all when None) rerun with `params`, in
    order, the others kept from `lock`. An output's hash derives from its stage's params and dep hashes."""
    lock = copy.deepcopy(lock) if lock else {"schema": "2.0", "stages": {}}
    for name, (sections, deps, outs) in PIPELINE.items():
        if targets is not None and name not in targets:
            continue
        produced = {o["path"]: o["md5"] for st in lock["stages"].values() for o in st["outs"]}
        dep_entries = [{"path": d, "md5": produced[d]} for d in deps]
        recorded = {s: params[s] for s in sections}
        key = json.dumps([name, recorded, dep_entries], sort_keys=True)
        lock["stages"][name] = {
            "cmd": f"python -m stages.{name}",
            "deps": dep_entries + [{"path": f"stages/{name}.py", "md5": "c0de"}],
            "params": {"params.yaml": recorded},
            "outs": [{"path": o, "md5": hashlib.md5((key + o).encode()).hexdigest()} for o in outs],
        }
    return lock


def _all_metrics(cam: float, seg: float, full: float) -> dict:
    return {SEEDS: {"data": {"cam": {"miou": cam}, "pacam": {"miou": cam}}}, PSEUDO: {"data": {"miou": cam + 0.1}},
            SEG: {"data": {"miou": seg, "crf": {"miou": seg + 0.01}}}, FULL: {"data": {"miou": full}}}


def _targets_run_then_compare(changed: dict, targets: set[str]) -> pd.Series:
    """`dvc repro` with the defaults, then `dvc exp run -S <changed> <targets>`: the experiment's row."""
    workspace_lock = _repro(FULL_PARAMS)
    exp_params = copy.deepcopy(FULL_PARAMS)
    for section, values in changed.items():
        exp_params[section].update(values)
    exp_lock = _repro(exp_params, targets, workspace_lock)
    # the experiment's commit carries the workspace's result files for the stages it did not rerun
    metrics = _all_metrics(0.25, 0.180, 0.330)
    metrics[SEEDS] = {"data": {"cam": {"miou": 0.30}, "pacam": {"miou": 0.29}}}
    show = [{"rev": "a" * 40, "name": "main", "data": {"params": {"params.yaml": {"data": FULL_PARAMS}}},
             "experiments": [{"name": "exp", "revs": [{"rev": "b" * 40, "data": {
                 "params": {"params.yaml": {"data": exp_params}}, "metrics": metrics}}]}]}]
    table = experiment_table(show, {"a" * 40: None, "b" * 40: exp_lock}.get)
    return table.set_index("experiment").loc["exp"]


def test_k_sweep_up_to_eval_seeds_shows_no_deeplab_number() -> None:
    """The fresh-clone report: K=3 up to eval_seeds showed the workspace's K=5 DeepLab numbers."""
    row = _targets_run_then_compare({"params": {"K": 3}}, {"train_cls", "make_seeds", "eval_seeds@cls"})
    assert row["seeds_cam"] == 30.0
    for metric in ("pseudo", "deeplab", "deeplab_crf"):
        assert pd.isna(row[metric]) and metric in row["stale"], metric
    assert row["upper_bound"] == 33.0 and "upper_bound" not in row["stale"]  # its chain reads no seeds


def test_upstream_change_outside_a_stages_params_is_caught_by_the_hashes() -> None:
    """train_cls.epochs is declared by neither pseudo_labels, eval_pseudo, train_seg nor eval_seg: only the
    dep hashes along the chain show that their inputs were made by another classifier."""
    row = _targets_run_then_compare({"train_cls": {"epochs": 2}}, {"train_cls", "make_seeds", "eval_seeds@cls"})
    assert row["seeds_cam"] == 30.0
    assert pd.isna(row["pseudo"]) and pd.isna(row["deeplab"]) and "deeplab" in row["stale"]
    assert row["upper_bound"] == 33.0


def test_full_rerun_is_fresh_everywhere() -> None:
    row = _targets_run_then_compare({"params": {"K": 3}}, None)
    assert row["stale"] == "" and row["deeplab"] == 18.0 and row["pseudo"] == 35.0


def test_baseline_is_labelled_committed_and_the_workspace_has_its_own_row() -> None:
    """Committed result files with no dvc.lock show nothing; the user's `dvc repro` shows as `workspace`."""
    show = [
        {"rev": "workspace", "data": {"params": {"params.yaml": {"data": FULL_PARAMS}},
                                      "metrics": _all_metrics(0.280, 0.263, 0.350)}},
        {"rev": "a" * 40, "name": "main", "data": {"params": {"params.yaml": {"data": FULL_PARAMS}},
                                                   "metrics": _all_metrics(0.318, 0.314, 0.429)}},
    ]
    locks = {"workspace": _repro(FULL_PARAMS), "a" * 40: None}
    table = experiment_table(show, locks.get)
    table = sort_rows(table, swept_params(table)).set_index("experiment")
    assert list(table.index) == ["main (committed)", "workspace"]
    assert table.loc["workspace", "seeds_cam"] == 28.0 and table.loc["workspace", "deeplab"] == 26.3
    assert table.loc["main (committed)"][["seeds_cam", "deeplab", "upper_bound"]].isna().all()
    # a baseline commit whose dvc.lock vouches for its files shows them, still labelled as committed
    locks["a" * 40] = _repro(FULL_PARAMS)
    table = experiment_table(show, locks.get).set_index("experiment")
    assert table.loc["main (committed)", "seeds_cam"] == 31.8


def test_compare_quotes_a_command_for_any_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    show, locks = _exp_show()
    saved = tmp_path / "abl-show.json"
    saved.write_text(json.dumps(show))
    monkeypatch.setattr(compare, "git_lock_reader", lambda repo: locks.get)
    repo = tmp_path / "checkout"
    out = repo / "results" / "ablations"
    assert compare.main(["--json", str(saved), "--repo", str(repo), "--out", str(out), "--machine", "m",
                         "--title", "It's a title"]) == 0
    md = out.with_suffix(".md").read_text()
    assert "`cpal-compare --out results/ablations --machine m --title 'It'\"'\"'s a title'`" in md
    assert str(tmp_path) not in md


def test_a_lock_written_by_dvc_with_exponent_floats_is_read_as_numbers(tmp_path: Path) -> None:
    """DVC writes `1e-05` (YAML 1.2, no dot); PyYAML alone reads a string and every row's CRF went stale."""
    from cpal.report.experiments import git_lock_reader

    params = {"params": {"K": 5}, "crf": {"prob_clip": 1e-05, "bg_threshold": 0.4}}
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  refine_crf:\n    params:\n      params.yaml:\n        crf:\n"
        "          prob_clip: 1e-05\n          bg_threshold: 0.4\n    outs:\n    - path: results/eval_crf.json\n")
    lock = git_lock_reader(tmp_path)("workspace")
    assert lock["stages"]["refine_crf"]["params"]["params.yaml"]["crf"]["prob_clip"] == 1e-05
    show = [{"rev": "workspace", "data": {"params": {"params.yaml": {"data": params}},
                                          "metrics": {"results/eval_crf.json": {"data": {"miou": 0.667}}}}},
            {"rev": "a" * 40, "name": "main", "data": {"params": {"params.yaml": {"data": params}}}}]
    table = experiment_table(show, {"workspace": lock}.get).set_index("experiment")
    assert table.loc["workspace", "crf"] == 66.7 and table.loc["workspace", "stale"] == ""


def test_params_files_read_exponent_floats_as_numbers() -> None:
    from cpal.core.config import load_yaml

    assert load_yaml("lr: 1e-3\nclip: 1.0e-5\nn: 10\nq: '1e-3'\n") == {"lr": 1e-3, "clip": 1e-5, "n": 10, "q": "1e-3"}


def test_host_locks_are_merged_so_their_metrics_can_be_vouched_for(tmp_path: Path) -> None:
    """The stages of hosts/dvc.yaml (the CRF and IRN on each host's maps, AMN) record into hosts/dvc.lock, and a
    revision of the former layout into branches/<name>/dvc.lock: the lock reader merges them into the root's,
    for the workspace and for a committed revision alike."""
    import subprocess

    from cpal.report.experiments import WORKSPACE, git_lock_reader, host_of

    (tmp_path / "hosts").mkdir()
    (tmp_path / "branches" / "amn").mkdir(parents=True)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  data:\n    cmd: x\n")
    (tmp_path / "hosts" / "dvc.lock").write_text("schema: '2.0'\nstages:\n  eval_pseudo@crf:\n    cmd: z\n")
    (tmp_path / "branches" / "amn" / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train_amn:\n    cmd: y\n")
    read = git_lock_reader(tmp_path)
    assert set(read(WORKSPACE)["stages"]) == {"data", "eval_pseudo@crf", "train_amn"}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(git + ["add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "locks"], cwd=tmp_path, check=True)
    assert set(read("HEAD")["stages"]) == {"data", "eval_pseudo@crf", "train_amn"}
    (tmp_path / "dvc.lock").unlink()  # the other locks alone still count
    assert set(read(WORKSPACE)["stages"]) == {"eval_pseudo@crf", "train_amn"}
    assert host_of({"params": {"method": "cpal"}, "pseudo": {"source": "crf"}}) == "cpal classifier"
    assert host_of({"params": {"method": "cam"}, "pseudo": {"source": "amn_crf"},
                    "amn": {"plugin": "loss"}}) == "amn (plugin loss)"
