"""Argument handling shared by the stage entry points (kept tiny: logic lives in cpal/)."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from cpal.core.config import ParamsError, load_params
from cpal.core.io import write_json
from cpal.core.runtime import keep_freed_memory, peak_rss_mib, process_cost, setup_logging


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", required=True, help="params file (params.yaml or a preset)")
    p.add_argument("--log", default=None, help="log file for this stage")
    return p


def add_map_argument(p: argparse.ArgumentParser, section: str, choices: tuple[str, ...]) -> None:
    """``--map``: which seed map a refinement reads, for seed files that hold only one (AMN's hold cam).
    ``choices``: cpal.seeds.store.MAP_KEYS (passed in, so that this module imports no pipeline phase)."""
    p.add_argument("--map", choices=choices, default=None,
                   help=f"the seed map to read (default: {section}.map; AMN's seed files hold only cam)")


def write_timing(path: str, timing: dict[str, Any]) -> None:
    """A stage's timing JSON (a DVC metric), with this process's peak resident memory so far: experiments
    keep no stage logs, and a benchmark reads what each stage needed from here (cpal.report.experiments)."""
    write_json(path, {**timing, "peak_rss_mib": peak_rss_mib()})


def start(args: argparse.Namespace, name: str,
          check: Callable[[dict[str, Any], str], None] | None = None) -> tuple[logging.Logger, dict[str, Any]]:
    """Open the stage's log and load validated params; a bad params file exits with status 2, as does one that
    fails ``check`` (params, source), a stage's own check before any work.

    The log's first and last lines ("started", "finished") time the stage for the report. Under torchrun
    (WORLD_SIZE > 1) only rank 0 writes the log file, appending when the stage relaunched itself.
    """
    if _under_torchrun():  # one of several DDP processes: rank 0 logs to the file, the others warnings only
        from cpal.core.distributed import rank_logging

        log = rank_logging(setup_logging(None, name), args.log)
    else:
        log = setup_logging(args.log, name)
    log.info("started")
    outcome = {"failed": False}
    atexit.register(_finished, log, outcome)
    previous_hook = sys.excepthook

    def log_failure(kind, value, tb) -> None:  # an uncaught error: the log must not end in "finished"
        outcome["failed"] = True
        log.error("failed: %s: %s", kind.__name__, value)
        previous_hook(kind, value, tb)

    sys.excepthook = log_failure
    try:
        params = load_params(args.params)
        if check is not None:
            check(params, args.params)
    except ParamsError as exc:
        outcome["failed"] = True
        log.error("%s", exc)
        raise SystemExit(2) from None
    keep_freed_memory()
    threads = params["run"].get("torch_threads", 0)
    if threads and "torch" in sys.modules:  # stages that use torch have imported it by now
        sys.modules["torch"].set_num_threads(threads)
    return log, params


def _under_torchrun() -> bool:
    """WORLD_SIZE > 1: this process is one rank of a torchrun job (cpal.core.distributed)."""
    return os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1")


def _finished(log: logging.Logger, outcome: dict[str, bool]) -> None:
    """Last log line at interpreter exit, "finished" or "failed", with the process's own cost
    (benchmarks/suite.py reads it). Skips streams already closed (stages called in-process by tests).
    """
    for handler in list(log.handlers):
        if getattr(getattr(handler, "stream", None), "closed", False):
            log.removeHandler(handler)
    log.info("%s %s", "failed" if outcome["failed"] else "finished", process_cost())
