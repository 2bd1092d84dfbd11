"""What every stage needs around its real work: a log file, seeds, the device, the machine's name."""

from __future__ import annotations

import logging
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np


def setup_logging(log_path: str | os.PathLike[str] | None, name: str) -> logging.Logger:
    """Log to stderr and, when given, to a per-stage file (Snakemake's `log:`), overwritten per run."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def seed_everything(seed: int) -> None:
    """Seed python, numpy and (if imported or importable) torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # torch is only needed by the model stages
        return
    torch.manual_seed(seed)


def machine_description() -> str:
    """One line naming the machine a number or figure came from."""
    parts = [f"{platform.system()} {platform.machine()}", f"{os.cpu_count()} CPU cores"]
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
        else:
            parts.append("no GPU")
        parts.append(f"torch {torch.__version__.split('+')[0]}")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)
