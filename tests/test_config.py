from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cpal.core.config import ParamsError, check_splits, load_params, merge, validate_params, write_resolved_params

ROOT = Path(__file__).resolve().parents[1]


def _error(params: dict) -> str:
    with pytest.raises(ParamsError) as info:
        validate_params(params)
    return str(info.value)


@pytest.mark.parametrize("name", ["params.yaml", "configs/tiny.yaml", "configs/voc12.yaml", "configs/coco14.yaml",
                                  "configs/embedded_gpu.yaml", "configs/folder_example.yaml"])
def test_shipped_params_files_are_valid(name: str) -> None:
    load_params(ROOT / name)


def test_k_zero_names_key_value_and_rule(default_params: dict) -> None:
    default_params["params"]["K"] = 0
    msg = _error(default_params)
    assert "params.K = 0" in msg and "minimum" in msg


def test_k_larger_than_bank(default_params: dict) -> None:
    default_params["params"]["K"] = default_params["params"]["bank_size"] + 1
    msg = _error(default_params)
    assert "params.K" in msg and "bank_size" in msg


def test_negative_temperature(default_params: dict) -> None:
    default_params["params"]["temperature"] = -0.1
    assert "params.temperature = -0.1" in _error(default_params)


def test_unknown_key(default_params: dict) -> None:
    default_params["params"]["kk"] = 3
    msg = _error(default_params)
    assert "unknown key" in msg and "'kk'" in msg and "bank_size" in msg


def test_unknown_section(default_params: dict) -> None:
    default_params["trian_cls"] = {}
    msg = _error(default_params)
    assert "'trian_cls'" in msg


def test_string_where_number_belongs(default_params: dict) -> None:
    default_params["params"]["temperature"] = "0.1"
    msg = _error(default_params)
    assert "params.temperature = '0.1'" in msg and "number" in msg


def test_bool_is_not_an_integer(default_params: dict) -> None:
    default_params["params"]["K"] = True
    assert "params.K" in _error(default_params)


def test_missing_section(default_params: dict) -> None:
    del default_params["run"]
    msg = _error(default_params)
    assert "run" in msg and "missing" in msg


def test_missing_key(default_params: dict) -> None:
    del default_params["data"]["embedded"]["n_train"]
    msg = _error(default_params)
    assert "data.embedded.n_train" in msg and "missing" in msg


def test_bad_enum_lists_allowed(default_params: dict) -> None:
    default_params["params"]["method"] = "cpaI"
    msg = _error(default_params)
    assert "'cpaI'" in msg and "sipe" in msg


def test_cross_key_rules(default_params: dict) -> None:
    p = copy.deepcopy(default_params)
    p["data"]["embedded"]["min_objects"] = 3
    p["data"]["embedded"]["max_objects"] = 2
    assert "min_objects" in _error(p)
    p = copy.deepcopy(default_params)
    p["data"]["embedded"]["object_scale"] = [0.4, 0.3]
    assert "object_scale" in _error(p)


def test_every_problem_is_listed(default_params: dict) -> None:
    default_params["params"]["K"] = 0
    default_params["run"]["device"] = "tpu"
    msg = _error(default_params)
    assert "params.K" in msg and "run.device" in msg


def test_load_params_errors(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(bad)


def test_merge_keeps_types_and_nesting() -> None:
    base = {"params": {"K": 5, "metric": "dot"}, "run": {"seed": 0}}
    out = merge(base, {"params": {"K": 7}})
    assert out == {"params": {"K": 7, "metric": "dot"}, "run": {"seed": 0}}
    assert base["params"]["K"] == 5


def test_write_resolved_params(tmp_path: Path, default_params: dict) -> None:
    target = tmp_path / "outputs" / "resolved.yaml"
    assert write_resolved_params(default_params, str(target)) == str(target)
    assert load_params(target) == default_params
    mtime = target.stat().st_mtime_ns
    write_resolved_params(default_params, str(target))
    assert target.stat().st_mtime_ns == mtime  # unchanged content is not rewritten
    write_resolved_params(merge(default_params, {"params": {"K": 7}}), str(target))
    assert load_params(target)["params"]["K"] == 7


def test_presets_are_up_to_date() -> None:
    """The presets in configs/ (all but tiny.yaml) are derived from params.yaml (scripts/make_presets.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_presets", ROOT / "scripts" / "make_presets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.presets(yaml.safe_load((ROOT / "params.yaml").read_text())).items():
        assert (ROOT / "configs" / name).read_text() == text, f"run: python scripts/make_presets.py ({name})"


@pytest.mark.parametrize(("preset", "section", "key", "allowed"), [
    ("voc12.yaml", "seeds", "split", "train_aug, train, val"),
    ("voc12.yaml", "seg", "val_split", "train_aug, train, val"),
    ("coco14.yaml", "train_cls", "train_split", "train, val"),
    ("tiny.yaml", "seg", "train_split", "train, val"),
])
def test_a_split_the_source_does_not_write_is_refused(preset: str, section: str, key: str, allowed: str) -> None:
    """A typo in a preset's split ('trainaug') is named before any work, with the splits the source writes."""
    params = load_params(ROOT / "configs" / preset)
    params[section][key] = "trainaug"
    with pytest.raises(ParamsError, match=rf"{section}\.{key} = 'trainaug' is invalid: data\.source "
                                          rf"'\w+' writes the splits {allowed}"):
        check_splits(params)


def test_splits_follow_the_sources_own_list() -> None:
    params = load_params(ROOT / "configs" / "voc12.yaml")
    params["data"]["voc12"]["splits"] = ["train", "val"]
    with pytest.raises(ParamsError, match=r"seeds\.split = 'train_aug' is invalid: .* writes the splits train, val"):
        check_splits(params)
    check_splits(load_params(ROOT / "configs" / "voc12.yaml"))  # the presets as written pass


def test_snakemake_refuses_a_split_the_source_does_not_write_before_any_work(tmp_path: Path) -> None:
    """Snakemake stops at parse time (a dry run too) naming the split; DVC's first stage, data, does the same."""
    import subprocess
    import sys

    bad = tmp_path / "typo.yaml"
    bad.write_text("seeds: {split: trainaug}\nseg: {train_split: trainaug}\n")
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile",
                          "configs/voc12.yaml", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0
    assert "seeds.split = 'trainaug' is invalid: data.source 'voc12' writes the splits train_aug, train, val" \
        in res.stdout + res.stderr
    from stages.data import main

    params = load_params(ROOT / "configs" / "tiny.yaml")
    params["seeds"]["split"] = params["seg"]["train_split"] = "trainaug"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as stop:
        main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "data"),
              "--log", str(tmp_path / "data.log")])
    assert stop.value.code == 2 and not (tmp_path / "data").exists()
    assert "seeds.split = 'trainaug' is invalid" in (tmp_path / "data.log").read_text()
