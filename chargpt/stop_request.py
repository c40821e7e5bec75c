"""Ctrl-C (or SIGTERM) as a request to stop between steps, so the checkpoint written on the way out is consistent."""

import signal


class StopRequest:
    """Turns the first Ctrl-C (or SIGTERM) into a flag the loop checks between steps, so the state saved is
    consistent; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
