"""Restart backoff of supervised processes (``caviar._backoff``)."""

from __future__ import annotations

from caviar._backoff import RestartBackoff


def test_delays_double_up_to_the_cap_and_reset_after_a_stable_run() -> None:
    backoff = RestartBackoff(base_s=0.5, max_s=4.0, stable_s=60.0)
    assert [backoff.next_delay(ran_s=1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.next_delay(ran_s=60.0) == 0.5  # it ran a minute: a fresh start
    assert backoff.next_delay(ran_s=59.0) == 1.0
