"""Cron arithmetic in a timezone with an injected clock: DST transitions, validation."""

from __future__ import annotations

from datetime import timedelta

import pytest

from caviar.service.schedules._cron import CronError, CronSchedule, check_cron, parse_timezone
from tests.service.test_schedules import utc


def test_next_after_is_strictly_after_and_in_utc() -> None:
    cron = CronSchedule("*/15 9-17 * * 1-5", "America/New_York")
    assert cron.next_after(utc(2024, 1, 8, 14, 0)) == utc(2024, 1, 8, 14, 15)  # 09:15 EST
    assert cron.next_after(utc(2024, 1, 8, 14, 14, 59)) == utc(2024, 1, 8, 14, 15)
    assert cron.next_after(utc(2024, 1, 8, 22, 46)) == utc(2024, 1, 9, 14, 0)  # after 17:45 -> 09:00
    assert cron.next_after(utc(2024, 1, 12, 23, 0)) == utc(2024, 1, 15, 14, 0)  # Friday -> Monday
    assert cron.local_stamp(utc(2024, 1, 15, 14, 0)) == "20240115T0900"


def test_ticks_and_last_tick() -> None:
    cron = CronSchedule("0 * * * *", "UTC")
    ticks = list(cron.ticks(utc(2024, 5, 1, 0, 0), utc(2024, 5, 1, 3, 0)))
    assert ticks == [utc(2024, 5, 1, 1), utc(2024, 5, 1, 2), utc(2024, 5, 1, 3)]
    assert cron.last_at_or_before(utc(2024, 5, 1, 3, 59), not_before=utc(2024, 5, 1)) == utc(2024, 5, 1, 3)
    assert cron.last_at_or_before(utc(2024, 5, 1, 3, 59), not_before=utc(2024, 5, 1, 3, 30)) is None


def test_berlin_0230_daily_fires_once_on_spring_forward_day() -> None:
    """02:30 does not exist on 2024-03-31 in Berlin: the tick moves to 03:30 CEST (01:30 UTC)."""
    cron = CronSchedule("30 2 * * *", "Europe/Berlin")
    ticks = list(cron.ticks(utc(2024, 3, 29, 12), utc(2024, 4, 2, 12)))
    assert ticks == [
        utc(2024, 3, 30, 1, 30),  # 02:30 CET
        utc(2024, 3, 31, 1, 30),  # the missing 02:30, fired once at 03:30 CEST
        utc(2024, 4, 1, 0, 30),  # 02:30 CEST
        utc(2024, 4, 2, 0, 30),
    ]
    assert [cron.local_stamp(t) for t in ticks][1] == "20240331T0330"


def test_berlin_0230_daily_fires_once_on_fall_back_day() -> None:
    """02:30 happens twice on 2024-10-27 in Berlin: it fires at the first one (CEST) only."""
    cron = CronSchedule("30 2 * * *", "Europe/Berlin")
    ticks = list(cron.ticks(utc(2024, 10, 25, 12), utc(2024, 10, 29, 12)))
    assert ticks == [
        utc(2024, 10, 26, 0, 30),
        utc(2024, 10, 27, 0, 30),  # 02:30 CEST; 02:30 CET (01:30 UTC) does not fire again
        utc(2024, 10, 28, 1, 30),
        utc(2024, 10, 29, 1, 30),
    ]
    # a clock that reads just after the first 02:30 (even inside the repeated hour) moves on to the next day
    assert cron.next_after(utc(2024, 10, 27, 0, 30)) == utc(2024, 10, 28, 1, 30)
    assert cron.next_after(utc(2024, 10, 27, 1, 15)) == utc(2024, 10, 28, 1, 30)


def test_sub_hourly_schedule_across_transitions_is_strictly_increasing() -> None:
    cron = CronSchedule("*/30 * * * *", "Europe/Berlin")
    spring = list(cron.ticks(utc(2024, 3, 30, 23, 59), utc(2024, 3, 31, 1, 59)))
    # 01:00 01:30 CET, then (02:00/02:30 do not exist) 03:00 03:30 CEST: no instant twice
    assert spring == [
        utc(2024, 3, 31, 0),
        utc(2024, 3, 31, 0, 30),
        utc(2024, 3, 31, 1),
        utc(2024, 3, 31, 1, 30),
    ]
    fall = list(cron.ticks(utc(2024, 10, 26, 23, 59), utc(2024, 10, 27, 3, 0)))
    assert fall == sorted(set(fall))
    assert len(fall) == len({cron.local_stamp(t) for t in fall})  # study names stay unique


def test_long_gap_is_enumerated_quickly() -> None:
    cron = CronSchedule("* * * * *", "Europe/Berlin")
    for start in (utc(2024, 3, 30), utc(2024, 10, 26)):
        ticks = list(cron.ticks(start, start + timedelta(days=2)))
        assert len(ticks) == 2 * 24 * 60 - 60 * (start.month == 10)  # the repeated hour fires once
        assert ticks == sorted(set(ticks))


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("* * * *", "5 fields"),
        ("0 0 * * * *", "5 fields"),
        ("@daily", "5 fields"),
        ("61 * * * *", "invalid cron"),
        ("a b c d e", "invalid cron"),
        ("0 0 30 2 *", "never fires"),
    ],
)
def test_invalid_cron(expression: str, fragment: str) -> None:
    with pytest.raises(CronError, match=fragment):
        check_cron(expression)


def test_cron_is_normalised() -> None:
    assert check_cron("  0   3 * *  1-5 ") == "0 3 * * 1-5"


@pytest.mark.parametrize("name", ["", "Mars/Olympus", "utc", "../etc/passwd", "/etc/localtime", "Europe"])
def test_unknown_timezone(name: str) -> None:
    with pytest.raises(CronError, match="unknown timezone"):
        parse_timezone(name)
