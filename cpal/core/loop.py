"""The set-up and bookkeeping every resumable training stage shares (train_cls, train_seg, train_amn,
train_irn), written once.

Determinism and seeds first (so a network built afterwards gets the same initial weights in every run),
then the optimizer with its poly schedule and AMP grad scaler, resumption from ``out_dir/resume.pt``,
one seeded DataLoader per epoch, the optimisation step, the per-epoch record (log, dvclive, resume
checkpoint) and the final files. The stage keeps what differs: data, model, loss and metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cpal.core.distributed import DistContext
from cpal.core.runtime import seed_everything
from cpal.core.training import (
    EpochMeans,
    amp_scaler,
    build_optimizer,
    load_resume,
    open_dvclive,
    poly_lambda,
    save_resume,
    scaled_step,
    set_determinism,
    timing_summary,
    write_training_outputs,
)

TIMED = ("seconds", "images_per_s")  # epoch record keys that go to timing.json, not metrics.json


class ResumableTraining:
    """One training run of a stage: ``name`` prefixes its dvclive metrics and progress bars.

    ``dvclive`` False keeps no dvclive record (train_irn never had one: its output folder stays as it was)."""

    def __init__(self, name: str, ctx: DistContext, out_dir: Path, log: logging.Logger, seed: int,
                 dvclive: bool = True) -> None:
        self.name, self.ctx, self.device, self.out_dir, self.seed = name, ctx, ctx.device, Path(out_dir), seed
        self.with_dvclive = dvclive
        set_determinism(self.device)
        seed_everything(seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume_path = self.out_dir / "resume.pt"
        self.log = log
        self.info: Callable[..., None] = log.info if ctx.is_main else (lambda *a, **k: None)
        self.live: Any = None
        self.stateful: dict[str, Any] = {}

    def optimise(self, model: nn.Module, groups: list[dict[str, Any]], cfg: dict[str, Any], total_steps: int,
                 warmup_steps: int = 0) -> None:
        """Optimizer (``cfg`` optimizer / lr / momentum / weight_decay), poly schedule over ``total_steps``
        (power ``cfg['poly_power']``) and the grad scaler, live under AMP only on CUDA with ``cfg['amp']``."""
        self.optimizer = build_optimizer(groups, cfg.get("optimizer", "sgd"), cfg["lr"], momentum=cfg["momentum"],
                                         weight_decay=cfg["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_lambda(total_steps, cfg["poly_power"], warmup_steps))
        self.scaler = amp_scaler(self.device, cfg["amp"])
        self.use_amp = self.scaler.is_enabled()
        self.stateful = {"model": model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                         "scaler": self.scaler}

    def resume(self, fingerprint: str) -> dict[str, Any] | None:
        """Restore model, optimizer, schedule, scaler and RNG from a resume checkpoint of the same
        ``fingerprint`` (None: start over), then open dvclive (appending when resumed) on the main rank."""
        self.fingerprint = fingerprint
        state = load_resume(self.resume_path, fingerprint, self.stateful, self.device, self.log)
        if self.ctx.is_main and self.with_dvclive:
            self.live = open_dvclive(self.out_dir / "dvclive", resume=state is not None and state["epoch"] > 0)
        return state

    def loader(self, data: Dataset, batches: Sampler, num_workers: int, epoch: int) -> DataLoader:
        """This epoch's DataLoader: its workers' seeds depend only on the run's seed and the epoch."""
        return DataLoader(data, batch_sampler=batches, num_workers=num_workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def step(self, loss: torch.Tensor, clip_params: Any = None, clip_norm: float = 0.0) -> None:
        """One optimisation step through the grad scaler; the gradient norm clipped when ``clip_norm`` > 0."""
        scaled_step(self.optimizer, self.scaler, self.scheduler, loss, clip_params, clip_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def epoch_record(self, epoch: int, terms: EpochMeans, t0: float) -> dict[str, Any]:
        """The epoch's loss means (summed over the ranks under DDP), its number, seconds since ``t0``,
        images/s and the learning rate: the record :meth:`end_epoch` keeps, a stage adding its own figures."""
        if self.ctx.distributed:  # per-image sums over every rank: the single-process epoch means
            terms.reduce(self.ctx)
        seconds = time.perf_counter() - t0
        record = terms.means()
        record.update(epoch=epoch + 1, seconds=seconds, images_per_s=terms.seen / max(seconds, 1e-9), lr=self.lr)
        return record

    def end_epoch(self, epoch: int, n_epochs: int, record: dict[str, Any], history: list[dict[str, Any]],
                  meta: dict[str, Any], stop_after_epoch: int | None, **extra: Any) -> bool:
        """Add the epoch's record to ``history``, log it, checkpoint for resumption (``extra`` saved beside it)
        and say whether to stop early as asked (``stop_after_epoch``, for tests of resumption). The record's
        ``epoch`` and ``step`` keys are not sent to dvclive."""
        history.append(record)
        self.info("epoch %d/%d: %s", epoch + 1, n_epochs,
                  ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        if self.live is not None:
            for key, value in record.items():
                if key not in ("epoch", "step"):
                    self.live.log_metric(f"{self.name}/{key}", value)
            self.live.next_step()
        if self.ctx.is_main:
            save_resume(self.resume_path, self.fingerprint, self.stateful, epoch=epoch + 1, history=history,
                        meta=meta, **extra)
        self.ctx.barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < n_epochs:
            self.info("stopping after epoch %d as asked", epoch + 1)
            return True
        return False

    def finish(self, model: nn.Module, meta: dict[str, Any], metrics: dict[str, Any], history: list[dict[str, Any]],
               **timing_extra: Any) -> dict[str, Any]:
        """model.pt (meta + weights), metrics.json, timing.json (``timing_extra`` added); the resume file goes.

        metrics.json is the stage's ``metrics`` with the final loss and the history added, the history without
        its timings: those go to timing.json, so metrics.json is byte-identical across runs with the same seed
        on CPU. Returns what metrics.json holds."""
        metrics = {**metrics, "final_loss": history[-1]["loss"] if history else None,
                   "history": [{k: v for k, v in h.items() if k not in TIMED} for h in history]}
        if self.live is not None:
            self.live.end()
        timing = timing_summary(history, self.device, self.ctx.world_size if self.ctx.distributed else 1,
                                amp=self.use_amp)
        timing.update(timing_extra)
        write_training_outputs(self.out_dir, self.ctx.is_main, {"meta": meta, "model": model.state_dict()}, metrics,
                               timing, self.resume_path)
        self.ctx.barrier()
        return metrics
