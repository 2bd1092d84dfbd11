"""The plug-in example (examples/cpal_in_timm.py) runs as a user would run it: on the tiny preset's data,
with finite losses, and the saved host carries the support bank the plug-in filled."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cpal_in_timm.py"


def test_example_host_code_is_under_40_lines() -> None:
    text = EXAMPLE.read_text()
    body = text.split("# ---- your code with CPAL: from here ----")[1].split("# ---- to here ----")[0]
    lines = [line for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) < 40, len(lines)


def test_example_trains_a_timm_host_with_cpal(tiny_data: Path, tmp_path: Path, one_torch_thread, capsys) -> None:
    spec = importlib.util.spec_from_file_location("cpal_in_timm", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--data", str(tiny_data), "--steps", "6", "--batch-size", "4", "--out", str(tmp_path)])
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+) \(L_self", capsys.readouterr().out)]
    assert losses and all(x == x for x in losses)  # printed, finite
    state = torch.load(tmp_path / "host.pt", weights_only=True)
    assert int(state["cpal.bank.count"].sum()) > 0  # the example's batches went into the bank
    assert state["cpal.bank.prototypes"].abs().sum() > 0
