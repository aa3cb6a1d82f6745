"""Periodic background work inside the service (the lease reaper, the scheduler)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

_log = logging.getLogger("caviar.background")


class PeriodicTask:
    """Run ``fn`` every ``interval_s`` seconds on a daemon thread until stopped.

    Errors are logged and the loop goes on (a database restart must not kill the reaper).
    """

    def __init__(self, name: str, interval_s: float, fn: Callable[[], object]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.fn = fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"caviar-{name}", daemon=True)

    def start(self) -> PeriodicTask:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
            except Exception:
                _log.exception("background task %s failed; retrying in %.1fs", self.name, self.interval_s)
