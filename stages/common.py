"""Argument handling shared by the stage entry points (kept tiny: logic lives in cpal/)."""

from __future__ import annotations

import argparse


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", required=True, help="params file (params.yaml or a preset)")
    p.add_argument("--log", default=None, help="log file for this stage")
    return p
