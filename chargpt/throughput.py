"""Training speed: tokens/s and the ETA from it."""

import time

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
        self.window_steps += 1
        if synced or not self.warmed_up:
            self.close_window()

    def close_window(self):
        if self.window_start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.warmed_up:
            self.seconds += time.perf_counter() - self.window_start
            self.steps += self.window_steps
        self.warmed_up = True
        self.window_start = None

    def tokens_per_sec(self):
        return self.tokens_per_step * self.steps / self.seconds if self.seconds else 0.0

    def eta(self, steps_left):
        return steps_left * self.seconds / self.steps if self.steps else 0.0
