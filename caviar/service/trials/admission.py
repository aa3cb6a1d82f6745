"""Ask admission: a bounded number of asks in flight per server process, each within a time limit.

An ask samples (it may take long: a GP over a long history) and holds database connections while
it does. Unbounded, a burst of asks takes every thread and connection of a process, and the
heartbeats behind them wait. So each process runs at most ``max_concurrent_asks`` asks at once,
each on its own thread (never the request thread pool that heartbeats use). An ask beyond that
waits in line for a turn, first come first served, holding no thread and no connection (a pending
future on the event loop), for at most ``ask_queue_s`` and behind at most ``max_queued_asks``
others; past either bound it is answered 429 ``too_many_asks`` with a jittered ``Retry-After``,
which caviar's client and worker honour. Renewals (heartbeats, reports) are never admitted away.

An ask that takes longer than ``ask_timeout_s`` is answered 503 ``sampler_slow``; its sampling
goes on (still holding the trial's lease and its admission slot) and the trial is handed back
once sampled (:func:`~caviar.service.trials.leases.release`: re-queued with its parameters, not
counted as a failure), so the next ask gets it at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import random
import threading
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from caviar.service.errors import RateLimited, Unavailable

T = TypeVar("T")

RETRY_AFTER_S = (1, 3)
"""The range (seconds, inclusive) a refused ask's ``Retry-After`` is drawn from when asks do not
wait in line (``ask_queue_s`` 0); the jitter spreads a burst's retries."""


def retry_after_range(queue_s: float) -> tuple[int, int]:
    """The ``Retry-After`` range of an ask refused after (or instead of) a wait in line: a line that
    is full, or did not move within ``queue_s``, will not have room a second later. Between one and
    two waits in line, so a burst of thousands of asks retries a few times, not every second."""
    if queue_s <= 0:
        return RETRY_AFTER_S
    wait = math.ceil(queue_s)
    return wait, 2 * wait


class AskGate:
    """The asks one server process runs at once, and the line of those waiting for a turn.

    A slot is taken on the event loop (:meth:`enter`) and given back from any thread (:meth:`leave`,
    on the ask's own thread): it passes straight to the ask that has waited longest, so a waiting
    ask is never overtaken by one that arrives later.

    Args:
        limit: how many run at once (``max_concurrent_asks``).
        queue: how many may wait for a turn (``max_queued_asks``); 0 refuses at once.
    """

    def __init__(self, limit: int, queue: int = 0) -> None:
        self.limit = limit
        self.queue = queue
        self._lock = threading.Lock()
        self._running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """How many asks wait in line now."""
        return len(self._waiting)

    async def enter(self, wait_s: float) -> bool:
        """Take a slot, waiting in line for at most ``wait_s`` seconds if none is free.

        Returns:
            False, holding nothing, when the line is full or no turn came within ``wait_s``.
        """
        with self._lock:
            if self._running < self.limit and not self._waiting:
                self._running += 1
                return True
            if wait_s <= 0 or len(self._waiting) >= self.queue:
                return False
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), wait_s)
        except TimeoutError:
            return not self._leave_line(turn)  # a turn that came just as the wait ran out is taken
        except asyncio.CancelledError:  # the caller went away
            if not self._leave_line(turn):
                self.leave()  # the turn came meanwhile: pass it on
            raise
        return True

    def _leave_line(self, turn: asyncio.Future[None]) -> bool:
        """Step out of the line; False when ``turn`` was already given a slot (it holds it)."""
        with self._lock:
            if turn in self._waiting:
                self._waiting.remove(turn)
                return True
            return False

    def leave(self) -> None:
        """Give a slot back: to the ask that has waited longest, else to the free pool (any thread)."""
        with self._lock:
            if not self._waiting:
                self._running -= 1
                return
            turn = self._waiting.popleft()  # the slot is its own from here on
        turn.get_loop().call_soon_threadsafe(_grant, turn)


def _grant(turn: asyncio.Future[None]) -> None:
    if not turn.done():
        turn.set_result(None)


def too_many_asks(limit: int, retry_after: tuple[int, int]) -> RateLimited:
    """The refusal of an ask beyond the process's bound and its line, with a jittered Retry-After."""
    return RateLimited(
        f"this server process already runs {limit} asks (max_concurrent_asks) and no turn came free "
        "in line (ask_queue_s, max_queued_asks); repeat the ask after Retry-After seconds",
        code="too_many_asks",
        retry_after_s=random.randint(*retry_after),
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
    gate: AskGate,
    work: Callable[[], T],
    *,
    timeout_s: float,
    hand_back: Callable[[T], object],
    queue_s: float = 0.0,
) -> T:
    """Run ``work`` (an ask) on its own thread once ``gate`` gives it a slot, within ``timeout_s``.

    Raises:
        RateLimited: ``too_many_asks`` when the process runs ``gate.limit`` asks already and no
            turn came within ``queue_s`` (or the line was full).
        Unavailable: ``sampler_slow`` when ``work`` outran ``timeout_s``; ``hand_back`` then gets
            its result once it is done (on the ask's thread, which keeps the slot until then).
    """
    if not await gate.enter(queue_s):
        raise too_many_asks(gate.limit, retry_after_range(queue_s))
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
