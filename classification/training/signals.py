"""SIGINT/SIGTERM during training: a flag the loop checks at batch boundaries, so a stop saves a resumable state."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a resumable checkpoint at the next batch boundary.

    A second SIGINT while waiting raises KeyboardInterrupt (stop now; ``last.pt`` stays the
    previous complete checkpoint).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, _frame: Any) -> None:
        """The signal handler: remember the first signal; a second SIGINT stops at once."""
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: saving a resumable checkpoint at the next batch", signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGINT and SIGTERM inside the block (main thread only), then restore the handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)
        try:
            yield self
        finally:
            for number, handler in self.previous.items():
                signal.signal(number, handler)
