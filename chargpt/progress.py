"""The training status line: a tqdm bar on a terminal, plain lines in logs."""

import sys
import time


def plain_status(it, total, loss, tokens_per_sec, eta_seconds):
    """The status as one self-contained line, for logs: a text bar, the loss, tokens/s and the ETA."""
    done = it / max(total, 1)
    bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
    return f"[{bar}] {it}/{total} loss {loss:.4f} | {tokens_per_sec / 1e3:.1f}k tok/s | ETA {clock(eta_seconds)}"


def clock(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(max(seconds, 0)))


class Progress:
    """Loss, tokens/s and ETA as training goes, and the run's messages (evaluations, notes) between them.

    On a terminal, a tqdm bar redrawn in place. Elsewhere (a log file, a pipe) or without tqdm, a plain line every
    tenth of the run: redraws would fill a log with carriage returns. The ETA is ours, not tqdm's: it comes from
    training throughput alone, so evaluations and checkpoints do not skew it. Disabled, it prints nothing (the
    ranks of a data-parallel job other than rank 0).
    """

    def __init__(self, total, start=0, stream=None, enabled=True):
        self.total, self.stream, self.enabled = total, stream or sys.stdout, enabled
        self.next_line_at = start
        self.bar = None
        if enabled and self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # optional: the GPU machines run from a bare checkout without it
                return
            self.bar = tqdm(total=total, initial=start, file=self.stream, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def update(self, it, loss, tokens_per_sec, eta_seconds):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_sec / 1e3:.1f}k tok/s | ETA {clock(eta_seconds)}",
                                     refresh=False)
            self.bar.update(it - self.bar.n)
        elif it >= self.next_line_at:
            print(plain_status(it, self.total, loss, tokens_per_sec, eta_seconds), file=self.stream, flush=True)
            self.next_line_at = it + max(self.total // 10, 1)

    def print(self, message):
        """A line of its own, without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self):
        """End the bar, leaving it on screen; later messages go below it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
