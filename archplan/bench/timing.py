"""Timed calls shared by `bench` (runner) and its `--seq` sweep: CUDA events on GPU, perf_counter
on CPU, under one transient rich progress bar."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


@dataclass(frozen=True)
class Timing:
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    @property
    def spread(self) -> float:
        """p90 / p10: one kernel sequence timed again on an idle machine stays within a few percent."""
        low = self.quantile(0.1)
        return self.quantile(0.9) / low if low > 0 else 1.0

    def noise_note(self, what: str, reported: str = "the median", samples_flag: str = "--iters") -> str | None:
        """A line when the timings spread past NOISY_SPREAD, which an idle host does not show: the
        `reported` figure still stands, but another process (or throttling) shared the run.
        `samples_flag`: the option that sets how many samples there are."""
        if len(self.samples) < MIN_JUDGED_SAMPLES or self.spread <= NOISY_SPREAD:
            return None
        load = ""
        if hasattr(os, "getloadavg"):
            load = f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        return (f"{what} timings spread {self.spread:.2f}× from p10 to p90 (past {NOISY_SPREAD:.1f}×, which "
                f"one forward repeated back to back does not reach alone){load}: {reported} is reported, "
                f"but rerun on an idle machine or with more {samples_flag} before trusting it")


# p90/p10 of repeated timings beyond which a run is called noisy: the same forward timed back to
# back repeats its kernels, so only another load (or throttling) makes one take half again as long.
NOISY_SPREAD = 1.5
# fewer timed passes than this have no spread to judge: p10 and p90 are the same one or two
MIN_JUDGED_SAMPLES = 3


def progress_bar(console: Console) -> Progress:
    """A transient bar on a terminal; none elsewhere, where rich would leave an empty line behind."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)


def time_calls(fn: Callable[[], object], device: torch.device, n: int, progress: Progress, label: str,
               between: Callable[[], None] | None = None) -> Timing:
    """n timed calls of fn; `between` runs untimed after each (the decode calibration's samples)."""
    task = progress.add_task(label, total=n)
    samples = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        if between is not None:
            between()
        progress.advance(task)
    progress.remove_task(task)
    return Timing(tuple(samples))
