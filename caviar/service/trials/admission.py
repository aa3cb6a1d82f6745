"""Ask admission: a bounded number of asks in flight per server process, each within a time limit.

An ask samples (it may take long: a GP over a long history) and holds database connections while
it does. Unbounded, a burst of asks takes every thread and connection of a process, and the
heartbeats behind them wait. So each process runs at most ``max_concurrent_asks`` asks at once,
each on its own thread (never the request thread pool that heartbeats use); one more is answered
429 ``too_many_asks`` with a jittered ``Retry-After``, which caviar's client and worker honour.
Renewals (heartbeats, reports) are never admitted away.

An ask that takes longer than ``ask_timeout_s`` is answered 503 ``sampler_slow``; its sampling
goes on (still holding the trial's lease and its admission slot) and the trial is handed back
once sampled (:func:`~caviar.service.trials.leases.release`: re-queued with its parameters, not
counted as a failure), so the next ask gets it at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import threading
from collections.abc import Callable
from typing import TypeVar

from caviar.service.errors import RateLimited, Unavailable

T = TypeVar("T")

RETRY_AFTER_S = (1, 3)
"""The range (seconds, inclusive) a refused ask's ``Retry-After`` is drawn from (the jitter spreads
a burst's retries)."""


class AskGate:
    """The asks one server process runs at once.

    Args:
        limit: how many (``max_concurrent_asks``).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def try_enter(self) -> bool:
        """Take a slot if one is free (never waits)."""
        return self._slots.acquire(blocking=False)

    def leave(self) -> None:
        """Give a slot back."""
        self._slots.release()


def too_many_asks(limit: int) -> RateLimited:
    """The refusal of an ask beyond the process's bound, with a jittered Retry-After."""
    return RateLimited(
        f"this server process already runs {limit} asks (max_concurrent_asks); repeat the ask after "
        "Retry-After seconds",
        code="too_many_asks",
        retry_after_s=random.randint(*RETRY_AFTER_S),
    )


def sampler_slow(timeout_s: float) -> Unavailable:
    """The answer to an ask whose sampler outran ``ask_timeout_s`` (its trial is handed back)."""
    return Unavailable(
        f"the study's sampler took longer than {timeout_s:g}s (ask_timeout_s); the trial it was "
        "sampling is handed back once sampled and the next ask gets it: repeat the ask",
        code="sampler_slow",
        retry_after_s=1,
    )


class _Handoff:
    """Who gets an ask's result: the request (delivered) or nobody (abandoned: hand it back)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.delivered = False
        self.abandoned = False


async def admitted(
    gate: AskGate, work: Callable[[], T], *, timeout_s: float, hand_back: Callable[[T], object]
) -> T:
    """Run ``work`` (an ask) on its own thread if ``gate`` has a slot, within ``timeout_s``.

    Raises:
        RateLimited: ``too_many_asks`` when the process runs ``gate.limit`` asks already.
        Unavailable: ``sampler_slow`` when ``work`` outran ``timeout_s``; ``hand_back`` then gets
            its result once it is done (on the ask's thread, which keeps the slot until then).
    """
    if not gate.try_enter():
        raise too_many_asks(gate.limit)
    handoff = _Handoff()
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def job() -> None:
        try:
            result = work()
        except BaseException as exc:
            gate.leave()
            future.set_exception(exc)
            return
        with handoff.lock:
            abandoned = handoff.abandoned
            handoff.delivered = not abandoned
        if abandoned:
            try:
                with contextlib.suppress(Exception):  # the reaper recovers a trial not handed back
                    hand_back(result)
            finally:
                gate.leave()
            return
        gate.leave()
        future.set_result(result)

    try:
        threading.Thread(target=job, name="caviar-ask", daemon=True).start()
    except BaseException:
        gate.leave()
        raise
    waiting = asyncio.wrap_future(future)
    try:
        return await asyncio.wait_for(asyncio.shield(waiting), timeout_s)
    except TimeoutError:
        with handoff.lock:
            if not handoff.delivered:
                handoff.abandoned = True
                waiting.cancel()
                raise sampler_slow(timeout_s) from None
        return await waiting  # it finished just as the limit passed
