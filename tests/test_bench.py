"""Benchmarks as DVC experiments (cpal/report/bench.py): the benchmark files, what is refused before anything
runs, which experiments count as recorded, the table, and one real run on the tiny preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cpal.amn.train import check_label_source
from cpal.core.config import merge
from cpal.report import bench

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "benchmarks").glob("*.yaml"))


def _spec(tmp_path: Path, name: str = "mini", **changes) -> Path:
    raw = {"title": "Mini", "out": "results/mini", "seeds": [0, 1], "targets": ["hosts/dvc.yaml:eval_seeds@cls"],
           "columns": {"cam": {"params": {"method": "cam"}}, "noflip": {"params": {"method": "cam"},
                                                                      "seeds": {"flip": False}}},
           "metrics": ["seeds", "s_make_seeds"], "pairs": [["noflip", "cam"]]}
    raw.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_benchmark_file_gives_valid_experiments(path: Path) -> None:
    """Each committed benchmark: its columns are valid pipeline settings (the schema, and AMN's rule that
    amn.plugin matches the classifier that made its IR labels), its targets are DVC stages."""
    spec = bench.load_spec(path)
    exps = bench.experiments(spec, ROOT / "params.yaml")
    assert len(exps) == len(spec.seeds) * len(spec.columns)
    assert len({e.name for e in exps}) == len(exps)
    for exp in exps:
        if exp.params["pseudo"]["source"].startswith("amn"):  # AMN runs: its rule holds
            check_label_source(exp.params)
        assert exp.params["run"]["seed"] == exp.seed
    bench.check_targets(spec, ROOT)


def test_every_metric_a_benchmark_can_read_is_a_file_a_dvc_stage_writes() -> None:
    """A benchmark's row reads what a DVC stage records; a path no stage writes would be an always-empty row."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        written = {Path(out.fs_path).resolve().relative_to(ROOT.resolve()).as_posix()
                   for stage in repo.index.stages for out in stage.outs}
    assert sorted({m.path for m in bench.BENCH_METRICS} - written) == []
    peaks = [m for m in bench.BENCH_METRICS if m.label.startswith("mib_")]
    assert len(peaks) >= 6 and all(m.keys == ("peak_rss_mib",) and not m.is_miou for m in peaks)


def test_experiment_params_are_params_yaml_with_the_column_and_the_seed(tmp_path: Path, default_params: dict) -> None:
    spec = bench.load_spec(_spec(tmp_path, base={"crf": {"bg_threshold": 0.5}}))
    exps = bench.experiments(spec, ROOT / "params.yaml")
    assert [e.name for e in exps] == ["mini-cam-s0", "mini-noflip-s0", "mini-cam-s1", "mini-noflip-s1"]
    noflip = exps[1]
    assert noflip.overrides == {"crf.bg_threshold": 0.5, "params.method": "cam", "seeds.flip": False, "run.seed": 0}
    assert noflip.params == merge(default_params, {"crf": {"bg_threshold": 0.5}, "params": {"method": "cam"},
                                                   "seeds": {"flip": False}, "run": {"seed": 0}})


@pytest.mark.parametrize(("value", "text"), [(False, "false"), (None, "null"), ([1.0, 0.5], "[1.0, 0.5]"),
                                             (0.1, "0.1"), ("auto", "auto"), (3, "3")])
def test_values_are_written_as_dvc_set_reads_them(value, text: str) -> None:
    assert bench.set_value(value) == text
    assert yaml.safe_load(text) == value


def test_an_override_that_fails_the_schema_is_refused_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    path = _spec(tmp_path, columns={"cam": {"params": {"method": "cam"}}, "bad": {"seg": {"epochs": -1}}}, pairs=[])
    ran = []
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(bench, "run_exp_show", lambda repo: ran.append(repo))
    assert bench.main(["run", str(path), "--repo", str(ROOT)]) == 2
    err = capsys.readouterr().err
    assert "column 'bad'" in err and "seg.epochs=-1" in err and "seg.epochs" in err.split("invalid:")[1]
    assert ran == []


@pytest.mark.parametrize(("changes", "message"), [
    ({"colour": 1}, "unknown keys ['colour']"),
    ({"columns": {"Bad-Name": {}}}, "column 'Bad-Name'"),
    ({"metrics": ["seeds", "mious"]}, "unknown metrics ['mious']"),
    ({"pairs": [["cam", "cpal"]]}, "pair ['cam', 'cpal'] must name two columns"),
    ({"seeds": [0, -1]}, "seeds must be a list"),
    ({"ratios": [["seeds", "deeplab"]]}, "ratio ['seeds', 'deeplab']"),
    ({"goals": [{"pair": ["noflip", "cpal"], "metric": "seeds", "at_least": 2}]}, "goal {'pair': ['noflip', 'cpal']"),
    ({"goals": [{"pair": ["noflip", "cam"], "metric": "s_make_seeds", "at_least": 2}]}, "an mIoU metric"),
    ({"goals": [{"pair": ["noflip", "cam"], "metric": "seeds"}]}, "at_least or at_most: <points>"),
    ({"goals": [{"pair": ["noflip", "cam"], "metric": "seeds", "at_least": 2, "at_most": 3}]}, "at_least or at_most"),
    ({"gains": [["seeds", "s_make_seeds"]]}, "gain ['seeds', 's_make_seeds'] must name two of the benchmark's mIoU"),
    ({"goals": [{"gain": ["seeds", "seeds"], "column": "cpal", "at_most": 2}]}, "columns ['cam', 'noflip']"),
])
def test_a_malformed_benchmark_file_is_refused_naming_the_key(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(bench.BenchError) as error:
        bench.load_spec(_spec(tmp_path, **changes))
    assert message in str(error.value)


def test_x_keys_hold_shared_anchors_and_are_not_read(tmp_path: Path) -> None:
    """`x-...` keys are for YAML anchors several columns share (benchmarks/testbed.yaml); a typo elsewhere is
    still refused."""
    spec = bench.load_spec(_spec(tmp_path, **{"x-photo": {"noise": 5}}))
    assert set(spec.columns) == {"cam", "noflip"}
    with pytest.raises(bench.BenchError, match="unknown keys \\['xphoto'\\]"):
        bench.load_spec(_spec(tmp_path, xphoto={"noise": 5}))


def test_an_unknown_target_is_refused_naming_the_stages(tmp_path: Path) -> None:
    spec = bench.load_spec(_spec(tmp_path, targets=["eval_sed@seg"]))
    with pytest.raises(bench.BenchError, match=r"unknown targets \['eval_sed@seg'\].*eval_seg@seg"):
        bench.check_targets(spec, ROOT)


def _show(entries: list[tuple[str, dict, float | None]], base: dict) -> list[dict]:
    """A `dvc exp show --json` with one experiment per (name, params, seeds mIoU fraction)."""
    def data(params: dict, miou: float | None) -> dict:
        metrics = {} if miou is None else {"results/eval_seeds.json": {"data": {"cam": {"miou": miou}}},
                                           "outputs/seeds/timing.json": {"data": {"seconds": 10.0}}}
        return {"params": {"params.yaml": {"data": params}}, "metrics": metrics}

    return [{"rev": "a" * 40, "name": "main", "data": data(base, None), "experiments": [
        {"name": name, "revs": [{"rev": f"{i:040d}", "data": data(params, miou)}]}
        for i, (name, params, miou) in enumerate(entries)]}]


def _fresh_lock(params: dict) -> dict:
    """A dvc.lock that vouches for eval_seeds.json and the seed timing under `params`."""
    return {"stages": {"make_seeds": {"params": {"params.yaml": {"seeds": params["seeds"]}}, "deps": [],
                                      "outs": [{"path": "outputs/seeds/maps", "md5": "m"},
                                               {"path": "outputs/seeds/timing.json", "md5": "t"}]},
                       "eval_seeds": {"params": {"params.yaml": {"seeds": params["seeds"]}},
                                      "deps": [{"path": "outputs/seeds/maps", "md5": "m"}],
                                      "outs": [{"path": "results/eval_seeds.json", "md5": "e"}]}}}


def test_recorded_keeps_experiments_run_with_their_params_and_resumes_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An experiment counts only with the params it was meant to run (a benchmark file edited since, or an
    older run under that name, is run again) and with every mIoU metric recorded fresh."""
    spec = bench.load_spec(_spec(tmp_path))
    exps = {e.name: e for e in bench.experiments(spec, ROOT / "params.yaml")}
    other = merge(exps["mini-cam-s1"].params, {"seeds": {"flip": False}})
    show = _show([("mini-cam-s0", exps["mini-cam-s0"].params, 0.40),
                  ("mini-noflip-s0", exps["mini-noflip-s0"].params, 0.43),
                  ("mini-cam-s1", other, 0.41),  # recorded with other params
                  ("mini-noflip-s1", exps["mini-noflip-s1"].params, None)],  # no metric: did not finish
                 exps["mini-cam-s0"].params)
    by_rev = {r["rev"]: r["data"]["params"]["params.yaml"]["data"] for c in show for e in c["experiments"]
              for r in e["revs"]}
    by_rev["a" * 40] = exps["mini-cam-s0"].params
    monkeypatch.setattr(bench, "git_lock_reader", lambda repo: lambda rev: _fresh_lock(by_rev[rev]))
    seeds = bench.recorded(spec, list(exps.values()), show, tmp_path).set_index("experiment")["seeds"]
    done = bench.recorded(spec, list(exps.values()), show, tmp_path)
    assert list(seeds.index) == ["mini-cam-s0", "mini-noflip-s0", "mini-noflip-s1"]
    assert seeds.iloc[:2].tolist() == [40.0, 43.0] and pd.isna(seeds.iloc[2])
    assert [e.name for e in bench.missing(spec, list(exps.values()), done)] == ["mini-cam-s1", "mini-noflip-s1"]


def test_table_gives_mean_and_std_over_seeds_and_pairs_by_seed(tmp_path: Path) -> None:
    spec = bench.load_spec(_spec(tmp_path, ratios=[["seeds", "s_make_seeds"]]))
    done = pd.DataFrame([
        {"experiment": "x", "column": "cam", "seed": 0, "rev": "r", "seeds": 40.0, "s_make_seeds": 10.0},
        {"experiment": "x", "column": "cam", "seed": 1, "rev": "r", "seeds": 44.0, "s_make_seeds": 12.0},
        {"experiment": "x", "column": "noflip", "seed": 0, "rev": "r", "seeds": 41.0, "s_make_seeds": 8.0},
        {"experiment": "x", "column": "noflip", "seed": 1, "rev": "r", "seeds": 47.0, "s_make_seeds": None}])
    md = bench.to_markdown(spec, done, "a machine", "abc1234")
    assert "| seeds | 42.0 ± 2.8 | 44.0 ± 4.2 |" in md
    assert "| s_make_seeds | 11 ± 1 | 8 |" in md  # seconds: no decimals; one value: one seed
    assert "- noflip minus cam, seeds: +2.0 ± 1.4 points (per seed +1.0, +3.0)." in md
    assert "| noflip | `params.method=cam`, `seeds.flip=false` |" in md
    assert "Machine: a machine. Code: commit abc1234" in md and "cpal-bench run " in md
    assert "s_make_seeds minus" not in md  # seconds are not paired as points


def test_goals_are_judged_on_the_mean_paired_gain(tmp_path: Path) -> None:
    goals = [{"pair": ["noflip", "cam"], "metric": "seeds", "at_least": 2},
             {"pair": ["cam", "noflip"], "metric": "seeds", "at_least": 0}]
    spec = bench.load_spec(_spec(tmp_path, goals=goals))
    done = pd.DataFrame([
        {"experiment": "x", "column": "cam", "seed": 0, "rev": "r", "seeds": 40.0, "s_make_seeds": 10.0},
        {"experiment": "x", "column": "cam", "seed": 1, "rev": "r", "seeds": 44.0, "s_make_seeds": 12.0},
        {"experiment": "x", "column": "noflip", "seed": 0, "rev": "r", "seeds": 41.0, "s_make_seeds": 8.0},
        {"experiment": "x", "column": "noflip", "seed": 1, "rev": "r", "seeds": 47.0, "s_make_seeds": 9.0}])
    md = bench.to_markdown(spec, done, "a machine", "abc1234")
    assert "- noflip minus cam, seeds: +2.00 ± 1.41 over 2 seeds (goal >= +2.0): met." in md
    assert "- cam minus noflip, seeds: -2.00 ± 1.41 over 2 seeds (goal >= +0.0): NOT met." in md
    md = bench.to_markdown(spec, done[done.column == "cam"], "a machine", "abc1234")
    assert "- noflip minus cam, seeds (goal >= +2.0): not measured." in md


def test_steps_within_a_column_are_paired_by_seed_and_judged_on_either_side(tmp_path: Path) -> None:
    """`gains`: what one step of the chain adds inside each column (the CRF over the seeds, IRN over the CRF);
    a goal on a step may be a ceiling (the CRF alone at most +10 over the seeds) or a floor."""
    goals = [{"gain": ["crf", "seeds"], "column": "cam", "at_most": 10},
             {"gain": ["crf", "seeds"], "column": "noflip", "at_most": 10},
             {"gain": ["crf", "seeds"], "column": "cam", "at_least": 5}]
    spec = bench.load_spec(_spec(tmp_path, metrics=["seeds", "crf"], gains=[["crf", "seeds"]], goals=goals))
    done = pd.DataFrame([
        {"experiment": "x", "column": "cam", "seed": 0, "rev": "r", "seeds": 40.0, "crf": 46.0},
        {"experiment": "x", "column": "cam", "seed": 1, "rev": "r", "seeds": 44.0, "crf": 52.0},
        {"experiment": "x", "column": "noflip", "seed": 0, "rev": "r", "seeds": 41.0, "crf": 61.0},
        {"experiment": "x", "column": "noflip", "seed": 1, "rev": "r", "seeds": 47.0, "crf": None}])
    md = bench.to_markdown(spec, done, "a machine", "abc1234")
    assert "- cam: crf minus seeds: +7.0 ± 1.4 points (per seed +6.0, +8.0)." in md
    assert "- noflip: crf minus seeds: +20.0 points (per seed +20.0)." in md  # seed 1 has no crf: left out
    assert "- cam: crf minus seeds: +7.00 ± 1.41 over 2 seeds (goal <= +10.0): met." in md
    assert "- noflip: crf minus seeds: +20.00 over 1 seed (goal <= +10.0): NOT met." in md
    assert "- cam: crf minus seeds: +7.00 ± 1.41 over 2 seeds (goal >= +5.0): met." in md
    md = bench.to_markdown(spec, done[done.column == "noflip"], "a machine", "abc1234")
    assert "- cam: crf minus seeds (goal <= +10.0): not measured." in md


def test_experiments_whose_metrics_cannot_be_read_are_named(tmp_path: Path) -> None:
    """A clone without the DVC cache: the experiments are there with their params, every metric is missing."""
    spec = bench.load_spec(_spec(tmp_path))
    blind = pd.DataFrame([{"experiment": "mini-cam-s0", "column": "cam", "seed": 0, "rev": "r", "seeds": None,
                           "s_make_seeds": None}])
    assert "dvc cache dir --local" in bench.unreadable_metrics(spec, blind)
    assert bench.unreadable_metrics(spec, blind.assign(seeds=40.0)) is None
    assert bench.unreadable_metrics(spec, blind.iloc[:0]) is None


def test_a_benchmark_runs_as_dvc_experiments_and_resumes(tmp_path: Path) -> None:
    """Tiny preset, two columns that share a classifier, one seed: two experiments, the second restores
    train_cls from DVC's run-cache; a second run of the command runs nothing; the workspace is untouched."""
    from pipeline_workspace import engine_env, tiny_workspace

    ws = tiny_workspace(tmp_path / "ws")
    (ws / "benchmarks").mkdir()
    spec = _spec(ws / "benchmarks", seeds=[0])
    before = (ws / "params.yaml").read_text()

    def cpal_bench(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "cpal.report.bench", *args], cwd=ws, env=engine_env(),
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout + res.stderr

    out = cpal_bench("run", str(spec.relative_to(ws)))
    assert "2 to run" in out and "Stage 'train_cls' is cached - skipping run" in out
    table = pd.read_csv(ws / "results" / "mini.csv")
    assert sorted(table["experiment"]) == ["mini-cam-s0", "mini-noflip-s0"] and table["seeds"].notna().all()
    assert (ws / "results" / "mini.png").is_file()
    md = (ws / "results" / "mini.md").read_text()
    assert "`cpal-bench run benchmarks/mini.yaml`" in md and "- noflip minus cam, seeds:" in md
    again = cpal_bench("run", "benchmarks/mini.yaml")
    assert "2 recorded, 0 to run" in again and "Running stage" not in again
    assert (ws / "params.yaml").read_text() == before and not (ws / "outputs").exists()


def test_a_mapping_over_a_null_setting_is_set_whole(tmp_path: Path) -> None:
    """data.embedded.photo is null in params.yaml: `-S data.embedded.photo.noise=8` cannot set a key inside it,
    so the mapping goes whole; keys under a mapping (data.embedded) stay one by one."""
    photo = {"shading": 0.6, "texture": 0.5, "edge_fade": 0.8, "clutter_match": 0.5, "blur": 0.8, "noise": 5}
    spec = bench.load_spec(_spec(tmp_path, base={"data": {"embedded": {"version": 2, "photo": photo}}}))
    exp = bench.experiments(spec, ROOT / "params.yaml")[0]
    assert exp.overrides["data.embedded.version"] == 2 and exp.overrides["data.embedded.photo"] == photo
    assert yaml.safe_load(bench.set_value(photo)) == photo


def test_a_null_param_matches_the_nan_a_table_makes_of_it_and_a_killed_run_is_no_experiment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Params are compared as `dvc exp show` recorded them: a baseline with data.embedded.photo null beside an
    experiment with photo settings turns the table's null into NaN and its 8 into 8.0; the experiment
    still counts as recorded."""
    photo = {"shading": 0.6, "texture": 0.5, "edge_fade": 0.8, "clutter_match": 0.5, "blur": 0.8, "noise": 8}
    spec = bench.load_spec(_spec(tmp_path, seeds=[0], columns={"cam": {"params": {"method": "cam"}}}, pairs=[],
                                 base={"data": {"embedded": {"version": 2, "photo": photo}}}))
    exp = bench.experiments(spec, ROOT / "params.yaml")[0]
    base = merge(exp.params, {"data": {"embedded": {"version": 1, "photo": None}}})
    show = _show([(exp.name, exp.params, 0.40)], base)
    monkeypatch.setattr(bench, "git_lock_reader", lambda repo: lambda rev: _fresh_lock(exp.params))
    done = bench.recorded(spec, [exp], show, tmp_path)
    assert done["experiment"].tolist() == [exp.name] and done["seeds"].tolist() == [40.0]
    assert bench.missing(spec, [exp], done) == []
    show = [{"rev": "a" * 40, "experiments": [{"name": "done", "executor": None, "revs": []},
                                              {"name": "killed", "executor": {"state": "running"}, "revs": []}]}]
    assert bench.finished_names(show) == {"done"}
