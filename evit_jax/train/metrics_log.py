"""Run logging: absl lines, WORKDIR/metrics.jsonl, TensorBoard events, tqdm bar on a tty.

Only process 0 writes files; every process logs through absl (prefixed by jax).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"


def _to_float(v: Any) -> float:
    return float(np.asarray(v))


def _ends_mid_line(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


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
            path = os.path.join(workdir, METRICS_FILE)
            self._jsonl = open(path, "a", buffering=1)
            if _ends_mid_line(path):  # a crash cut the last line short: start a fresh one
                self._jsonl.write("\n")
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
    """Train images/s and ETA over the TRAIN time since the last report.

    Time spent inside :meth:`paused` (evaluation, checkpoint saving, compilation) is not
    train time: it counts neither in the images/s nor in the time per step the ETA is
    extrapolated from (the run's total wall time is measured elsewhere).
    """

    def __init__(self, start_step: int, total_steps: int, clock: Callable[[], float] = time.perf_counter):
        self.total_steps = total_steps
        self._clock = clock
        self._t0 = clock()
        self._s0 = start_step
        self._paused_s = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The time spent in this block is left out of the current window."""
        t = self._clock()
        try:
            yield
        finally:
            self._paused_s += self._clock() - t

    def report(self, step: int, global_batch: int) -> tuple[float, float]:
        """(images/s, ETA in seconds) of the window since the last report, which ends here."""
        now = self._clock()
        train_s = max(now - self._t0 - self._paused_s, 1e-9)
        steps = step - self._s0
        img_s = steps * global_batch / train_s
        eta = (self.total_steps - step) * train_s / max(steps, 1)
        self._t0, self._s0, self._paused_s = now, step, 0.0
        return img_s, eta


#: Train metrics logged at their value on the last step of a logging window (the others are
#: window means): the learning rate is a schedule, its mean over the window is no lr ever used.
LAST_VALUE_METRICS = ("lr",)


def summarize_window(per_step: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """{"train/<name>": value} for the per-step train metrics of one logging window: the mean
    over the window, except :data:`LAST_VALUE_METRICS`, taken from its last step."""
    if not per_step:
        raise ValueError("a logging window needs at least one step.")
    return {f"train/{k}": _to_float(per_step[-1][k]) if k in LAST_VALUE_METRICS
            else float(np.mean([m[k] for m in per_step])) for k in per_step[-1]}


def read_logged(workdir: str, step: int) -> dict[str, float]:
    """The metrics logged at ``step`` in WORKDIR/metrics.jsonl, merged over its lines (later
    lines win: a resumed or re-evaluated run logs again); {} when none. A line cut short by a
    crash is skipped."""
    path = os.path.join(workdir, METRICS_FILE)
    merged: dict[str, float] = {}
    if not os.path.exists(path):
        return merged
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step") == step:
                merged.update({k: v for k, v in record.items() if k != "step"})
    return merged


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def log_line(step: int, total: int, metrics: Mapping[str, Any], img_s: float, eta: float) -> None:
    parts = " ".join(f"{k.split('/', 1)[-1]}={_to_float(v):.5g}" for k, v in metrics.items())
    logging.info("step %d/%d %s images/s=%.1f eta=%s", step, total, parts, img_s, format_eta(eta))
