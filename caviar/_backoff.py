"""Restart backoff for supervised child processes (``caviar serve`` processes, ``caviar worker`` slots)."""

from __future__ import annotations


class RestartBackoff:
    """How long to wait before restarting a child that exited: exponential, reset by a stable run.

    The n-th restart in a row waits ``base_s * 2**n`` seconds, at most ``max_s``; a child that
    ran at least ``stable_s`` before it exited starts the count again (one crash a day restarts
    at once; a child that crashes on start does not spin).

    Args:
        base_s: the first delay.
        max_s: the longest delay.
        stable_s: a run this long resets the count.
    """

    def __init__(self, base_s: float = 0.5, max_s: float = 30.0, stable_s: float = 60.0) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.stable_s = stable_s
        self.failures = 0

    def next_delay(self, ran_s: float) -> float:
        """The delay before the next restart of a child that ran ``ran_s`` seconds."""
        if ran_s >= self.stable_s:
            self.failures = 0
        delay = min(self.max_s, self.base_s * 2.0**self.failures)
        self.failures += 1
        return delay
