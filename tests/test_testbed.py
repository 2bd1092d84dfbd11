"""benchmarks/testbed.py: a regime whose overrides fail the schema is refused before anything runs, and the
tables compute the field's orderings from what the runs recorded."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from test_benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def testbed():
    return load_benchmark("testbed")


def test_every_committed_regime_validates(testbed) -> None:
    from cpal.core.config import load_yaml

    spec = load_yaml((ROOT / "benchmarks" / "testbed.yaml").read_text())
    for regime in spec["regimes"]:
        params = testbed.regime_params(spec, regime, 0)
        assert params["params"]["method"] == "cam" and params["amn"]["plugin"] == "none"  # no CPAL while choosing


def test_a_bad_regime_is_refused_before_anything_runs(testbed, tmp_path: Path) -> None:
    spec = {"base": {}, "targets": ["results/eval_seeds.json"],
            "regimes": {"odd": {"data": {"embedded": {"version": 7}}}}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(__import__("yaml").safe_dump(spec))
    with pytest.raises(SystemExit, match=r"data\.embedded\.version = 7 is invalid: 7 is not one of \[1, 2\]"):
        testbed.main(["--regimes", "odd", "--spec", str(spec_file), "--work", str(tmp_path / "w"),
                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown regime 'nope'; .* has: odd"):
        testbed.main(["--regimes", "nope", "--spec", str(spec_file), "--work", str(tmp_path / "w"),
                      "--out", str(tmp_path)])
    assert not (tmp_path / "w").exists()


def test_orderings_and_tables(testbed, tmp_path: Path) -> None:
    rows = []
    for seed, (seeds, crf, irn, aseeds, acrf, airn) in enumerate([(40, 50, 55, 44, 52, 58), (42, 50, 57, 45, 53, 60)]):
        for column, steps in (("cam", (seeds, crf, irn)), ("amn", (aseeds, acrf, airn))):
            for step, miou in zip(("seeds", "crf", "irn"), steps, strict=True):
                rows.append({"regime": "r", "image_size": 192, "grid": "12x12", "column": column, "seed": seed,
                             "step": step, "miou": miou, "seconds": 10.0})
    df = pd.DataFrame(rows, columns=testbed.COLUMNS)
    o = testbed.orderings(df)
    assert o["crf_over_seeds"].tolist() == [10, 8]
    assert o["irn_over_crf"].tolist() == [5, 7]
    assert o["amn_masks_over_cam_best"].tolist() == [3, 3]
    command = "python benchmarks/testbed.py --regimes r --seeds 0 1"
    testbed.write_tables(df, tmp_path, command, {"r": ("train_cls", 999)})
    md = (tmp_path / "testbed.md").read_text()
    assert "| r | 192 | 12x12 | 41.0 ± 1.4 (2) |" in md
    assert "| r | +9.0 ± 1.4 | +6.0 ± 1.4 | +3.0 ± 0.0 | +3.5 ± 0.7 | 999 (train_cls) |" in md
    assert (tmp_path / "testbed.png").stat().st_size > 10_000
    assert pd.read_csv(tmp_path / "testbed.csv").shape == (12, 8)
