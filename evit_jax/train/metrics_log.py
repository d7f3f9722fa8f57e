"""Run logging: absl lines, WORKDIR/metrics.jsonl, TensorBoard events, tqdm bar on a tty.

Only process 0 writes files; every process logs through absl (prefixed by jax).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


def _to_float(v: Any) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Writes scalar metrics keyed like ``train/loss``, ``eval/top1``, ``eval_ema/top1``."""

    def __init__(self, workdir: str, total_steps: int, *, enable_tensorboard: bool = True,
                 progress_bar: bool | None = None):
        self.is_writer = jax.process_index() == 0
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._bar = None
        if self.is_writer:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            if enable_tensorboard:
                from tensorboardX import SummaryWriter  # no TensorFlow needed
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            if progress_bar is None:
                progress_bar = sys.stdout.isatty()
            if progress_bar:
                from tqdm import tqdm
                self._bar = tqdm(total=total_steps, dynamic_ncols=True, desc="train")

    def set_start(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One JSON line {"step": step, **metrics} plus a TensorBoard scalar per key."""
        values = {k: _to_float(v) for k, v in metrics.items()}
        if not self.is_writer:
            return
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))

    def progress(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if postfix:
                self._bar.set_postfix({k: f"{_to_float(v):.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


class Throughput:
    """images/s and ETA over the steps since the last report."""

    def __init__(self, start_step: int, total_steps: int):
        self.total_steps = total_steps
        self._t0 = time.perf_counter()
        self._s0 = start_step

    def report(self, step: int, global_batch: int) -> tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        steps = step - self._s0
        img_s = steps * global_batch / dt
        eta = (self.total_steps - step) * dt / max(steps, 1)
        self._t0, self._s0 = now, step
        return img_s, eta


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def log_line(step: int, total: int, metrics: Mapping[str, Any], img_s: float, eta: float) -> None:
    parts = " ".join(f"{k.split('/', 1)[-1]}={_to_float(v):.5g}" for k, v in metrics.items())
    logging.info("step %d/%d %s images/s=%.1f eta=%s", step, total, parts, img_s, format_eta(eta))
