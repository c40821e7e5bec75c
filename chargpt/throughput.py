"""Training speed: tokens/s and the ETA from it, and a hint when step times jump as on an oversubscribed machine."""

import statistics
import time
from collections import deque

import torch


class Throughput:
    """Training tokens/s, evaluations and checkpoints left out. The clock is read only after a host sync the loop
    does anyway (a logged loss), so timing never drains the GPU queue; the first step (compilation, warm-up) is
    not counted."""

    def __init__(self, tokens_per_step, device):
        self.tokens_per_step, self.device = tokens_per_step, device
        self.seconds, self.steps = 0.0, 0
        self.window_start, self.window_steps = None, 0
        self.warmed_up = False

    def start_step(self):
        if self.window_start is None:
            self.window_start, self.window_steps = time.perf_counter(), 0

    def end_step(self, synced):
        """Count a step; `synced` closes the timing window there. Returns the mean seconds per step of the window
        closed, None when none was (or it was the warm-up)."""
        self.window_steps += 1
        if synced or not self.warmed_up:
            return self.close_window()
        return None

    def close_window(self):
        if self.window_start is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        per_step = None
        if self.warmed_up:
            seconds = time.perf_counter() - self.window_start
            self.seconds += seconds
            self.steps += self.window_steps
            per_step = seconds / self.window_steps if self.window_steps else None
        self.warmed_up = True
        self.window_start = None
        return per_step

    def tokens_per_sec(self):
        return self.tokens_per_step * self.steps / self.seconds if self.seconds else 0.0

    def eta(self, steps_left):
        return steps_left * self.seconds / self.steps if self.steps else 0.0


class StepTimeJumps:
    """Notices steps suddenly taking several times as long as they did, as when another process starts competing
    for the cores: on a busy CPU, OpenMP threads that spin-wait for each other make every op many times slower.

    A step is slow when it takes more than `factor` times the median of the recent ordinary steps; `streak` slow
    steps in a row (one is noise: a page fault, a checkpoint's after-effects) give the hint, once per run.
    """

    def __init__(self, threads, factor=3.0, streak=3, history=20, min_history=5):
        self.threads, self.factor, self.streak, self.min_history = threads, factor, streak, min_history
        self.recent = deque(maxlen=history)  # ordinary step times: the baseline
        self.slow = []
        self.reported = False

    def observe(self, step_seconds):
        """Take one step's duration; returns the hint (one line) the first time the jump is seen, else None."""
        if self.reported:
            return None
        if len(self.recent) >= self.min_history:
            baseline = statistics.median(self.recent)
            if step_seconds > self.factor * baseline:
                self.slow.append(step_seconds)
                if len(self.slow) < self.streak:
                    return None
                self.reported = True
                hint = (f"step times jumped from {_ms(baseline)} to {_ms(statistics.median(self.slow))}: "
                        f"another process may be competing for the cores")
                return hint + ("; try --threads 1" if self.threads > 1 else "")
        self.slow.clear()
        self.recent.append(step_seconds)
        return None


def _ms(seconds):
    return f"{seconds * 1e3:.3g} ms"
