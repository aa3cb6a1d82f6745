"""The ask gate: slots, the line of waiting asks, and a turn handed over from another thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from caviar.service.errors import RateLimited
from caviar.service.trials.admission import AskGate, admitted, retry_after_range


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


async def in_line(gate: AskGate, waiting: int) -> None:
    """Let the waiting tasks run until ``waiting`` asks stand in line."""
    while gate.waiting < waiting:
        await asyncio.sleep(0)


def test_a_free_slot_is_taken_at_once_and_none_past_the_limit_without_a_line() -> None:
    async def scenario() -> None:
        gate = AskGate(limit=2, queue=0)
        assert await gate.enter(10) and await gate.enter(10)
        assert not await gate.enter(10)  # no line: refused at once
        gate.leave()
        assert await gate.enter(0)

    run(scenario)


def test_waiting_asks_get_their_turns_first_come_first_served_from_another_thread() -> None:
    async def scenario() -> None:
        gate = AskGate(limit=1, queue=3)
        assert await gate.enter(10)
        order: list[str] = []

        async def wait(name: str) -> None:
            assert await gate.enter(10)
            order.append(name)

        waiters = [asyncio.create_task(wait(name)) for name in ("a", "b", "c")]
        await in_line(gate, 3)
        for expected in (["a"], ["a", "b"], ["a", "b", "c"]):
            thread = threading.Thread(target=gate.leave)  # as an ask's own thread gives its slot back
            thread.start()
            thread.join()
            while order != expected:
                await asyncio.sleep(0.001)
        await asyncio.gather(*waiters)
        assert gate.waiting == 0
        assert not await gate.enter(0)  # "c" holds the one slot

    run(scenario)


def test_a_newcomer_never_overtakes_the_line() -> None:
    async def scenario() -> None:
        gate = AskGate(limit=1, queue=1)
        assert await gate.enter(10)
        waiter = asyncio.create_task(gate.enter(10))
        await in_line(gate, 1)
        gate.leave()  # the slot is the waiter's now, before its task even runs
        assert not await gate.enter(0)
        assert await waiter

    run(scenario)


def test_a_full_line_refuses_at_once_and_a_wait_that_runs_out_leaves_the_line() -> None:
    async def scenario() -> None:
        gate = AskGate(limit=1, queue=1)
        assert await gate.enter(10)
        waiter = asyncio.create_task(gate.enter(0.05))
        await in_line(gate, 1)
        assert not await gate.enter(10)  # the line is full
        assert not await waiter  # no turn within 0.05 s
        assert gate.waiting == 0
        gate.leave()
        assert await gate.enter(0)  # the slot went back to the pool, not to the one that left

    run(scenario)


def test_a_cancelled_wait_passes_a_turn_it_was_given_on() -> None:
    async def scenario() -> None:
        gate = AskGate(limit=1, queue=2)
        assert await gate.enter(10)
        first = asyncio.create_task(gate.enter(10))
        second = asyncio.create_task(gate.enter(10))
        await in_line(gate, 2)
        gate.leave()  # the turn goes to ``first``...
        first.cancel()  # ...whose caller goes away before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second
        assert gate.waiting == 0

    run(scenario)


def test_admitted_refuses_with_too_many_asks_once_the_wait_runs_out() -> None:
    async def scenario() -> None:
        gate = AskGate(limit=1, queue=1)
        assert await gate.enter(10)
        with pytest.raises(RateLimited) as refused:
            await admitted(gate, lambda: 1, timeout_s=10, hand_back=lambda _: None, queue_s=0.05)
        assert refused.value.code == "too_many_asks"
        assert 1 <= refused.value.retry_after_s <= 2  # one to two waits of 0.05 s, in whole seconds
        assert "max_concurrent_asks" in str(refused.value) and "ask_queue_s" in str(refused.value)
        gate.leave()
        assert await admitted(gate, lambda: 7, timeout_s=10, hand_back=lambda _: None, queue_s=0.05) == 7
        assert await gate.enter(0)  # the admitted ask gave its slot back

    run(scenario)


def test_a_refusal_after_a_wait_in_line_retries_after_one_to_two_waits() -> None:
    assert retry_after_range(0) == (1, 3)  # no line: the retries of a burst spread over 1-3 s
    assert retry_after_range(5) == (5, 10)
    assert retry_after_range(0.5) == (1, 2)
