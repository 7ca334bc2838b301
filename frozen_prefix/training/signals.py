"""Signals during training: the first SIGINT/SIGTERM asks for a checkpoint and a stop, a second exits."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any


class SignalGuard:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second one exits at once.

    Under torchrun a Ctrl-C reaches every worker from the terminal and again from torchrun, which relays it:
    the same signal again within `relay_grace` seconds is that relay, not a second request.
    """

    def __init__(self, relay_grace: float = 0.0) -> None:
        self.received: str | None = None
        self.relay_grace, self._at = relay_grace, 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        relayed = signal.Signals(signum).name == self.received and time.monotonic() - self._at < self.relay_grace
        if relayed:
            return
        if self.received is not None:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.received, self._at = signal.Signals(signum).name, time.monotonic()
        print(f"\n{self.received}: finishing this step, writing a checkpoint, then stopping", file=sys.stderr)

    def __enter__(self) -> SignalGuard:
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()
