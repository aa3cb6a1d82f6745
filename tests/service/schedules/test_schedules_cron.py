"""Cron arithmetic in a timezone with an injected clock: DST transitions (Vixie cron's rule), validation.

The daylight-saving tests compare the ticks with a minute-by-minute simulation of Vixie cron's
main loop (:func:`vixie_fires`), across both transitions in four zones.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from caviar.service.schedules._cron import (
    CronError,
    CronSchedule,
    _changes_in_year,
    check_cron,
    is_wildcard,
    parse_timezone,
)
from tests.service.schedules.test_schedules import utc


@pytest.fixture(autouse=True)
def _cold_offset_cache() -> Iterator[None]:
    """Each test finds the zones' offset changes itself: with the cache warm from an earlier test,
    a broken probe or bisection would go unnoticed by all later ones."""
    _changes_in_year.cache_clear()
    yield


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
    """02:30 does not exist on 2024-03-31 in Berlin: it fires at the first instant after the gap."""
    cron = CronSchedule("30 2 * * *", "Europe/Berlin")
    ticks = list(cron.ticks(utc(2024, 3, 29, 12), utc(2024, 4, 2, 12)))
    assert ticks == [
        utc(2024, 3, 30, 1, 30),  # 02:30 CET
        utc(2024, 3, 31, 1, 0),  # the missing 02:30, fired once at 03:00 CEST (the clocks' change)
        utc(2024, 4, 1, 0, 30),  # 02:30 CEST
        utc(2024, 4, 2, 0, 30),
    ]
    assert [cron.local_stamp(t) for t in ticks][1] == "20240331T0300"


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
    assert cron.last_at_or_before(utc(2024, 10, 27, 1, 45), not_before=utc(2024, 10, 26)) == utc(
        2024, 10, 27, 0, 30
    )


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
        assert len(ticks) == 2 * 24 * 60  # every real minute, the repeated hour included
        assert ticks == sorted(set(ticks))


# --- Vixie cron's daylight-saving rule -----------------------------------------------------

# The 2026 transitions of each zone (UTC): (spring forward, fall back).
TRANSITIONS = {
    "Europe/Berlin": (utc(2026, 3, 29, 1), utc(2026, 10, 25, 1)),  # 02:00 CET -> 03:00 CEST; 03:00 -> 02:00
    "America/New_York": (utc(2026, 3, 8, 7), utc(2026, 11, 1, 6)),  # 02:00 EST -> 03:00 EDT; 02:00 -> 01:00
    "Australia/Sydney": (
        utc(2026, 10, 3, 16),
        utc(2026, 4, 4, 16),
    ),  # 02:00 AEST -> 03:00 AEDT; 03:00 -> 02:00
    "Australia/Lord_Howe": (utc(2026, 10, 3, 15, 30), utc(2026, 4, 4, 15)),  # half-hour changes
}
MINUTE = timedelta(minutes=1)


def vixie_fires(expression: str, timezone: str, start: datetime, end: datetime) -> list[datetime]:
    """When Vixie cron 4.1 runs a job in ``(start, end]``: its main loop (cron.c) simulated minute by minute.

    The clock is read once a minute; ``timeDiff`` is the local (wall-clock) minutes since the
    virtual clock. 1: run every job of the minute. More than 180 either way: the clock jumped,
    run every job of the new minute. 6..180 forward (spring forward): wildcard jobs of the new
    minute, fixed-time jobs of every minute skipped. 2..5: catch up minute by minute. Zero or
    backward (fall back): wildcard jobs of the new minute only; the virtual clock waits.
    """
    zone = ZoneInfo(timezone)
    minute_field, hour_field = expression.split()[:2]
    wildcard = minute_field.startswith("*") or hour_field.startswith("*")

    def local(moment: datetime) -> datetime:
        return moment.astimezone(zone).replace(tzinfo=None)

    matching: set[datetime] = set()
    matches = croniter(expression, local(start) - timedelta(days=1))
    while not matching or max(matching) < local(end) + timedelta(days=1):
        matching.add(matches.get_next(datetime))  # the wall-clock times that match, around the window
    fires: list[datetime] = []

    def find(moment: datetime, wall: datetime, *, wild: bool, fixed: bool) -> None:
        if wall in matching and (wild if wildcard else fixed) and moment not in fires:
            fires.append(moment)

    virtual, moment = local(start), start
    while moment < end:
        moment += MINUTE
        running = local(moment)
        diff = (running - virtual) // MINUTE
        if diff == 1 or abs(diff) > 180:
            virtual = running
            find(moment, running, wild=True, fixed=True)
        elif diff > 5:
            find(moment, running, wild=True, fixed=False)
            while virtual < running:
                virtual += MINUTE
                find(moment, virtual, wild=False, fixed=True)
        elif diff > 0:
            while virtual < running:
                virtual += MINUTE
                find(moment, virtual, wild=True, fixed=True)
        else:
            find(moment, running, wild=True, fixed=False)
    return fires


def test_every_20_minutes_has_no_gap_when_berlin_falls_back() -> None:
    """The issue's case: 00:40 -> 02:00 UTC was an 80-minute gap; now every 20 minutes of real time."""
    cron = CronSchedule("*/20 * * * *", "Europe/Berlin")
    ticks = list(cron.ticks(utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 2, 30)))
    assert ticks == [utc(2026, 10, 24, 23, 40) + k * timedelta(minutes=20) for k in range(9)]
    assert [cron.local_stamp(t)[9:] for t in ticks] == [
        "0140", "0200", "0220", "0240", "0200-2", "0220-2", "0240-2", "0300", "0320"
    ]  # fmt: skip
    hourly = CronSchedule("0 * * * *", "Europe/Berlin")
    assert utc(2026, 10, 25, 1) in hourly.ticks(utc(2026, 10, 25), utc(2026, 10, 25, 2))  # 02:00 CET


@pytest.mark.parametrize("timezone", list(TRANSITIONS))
@pytest.mark.parametrize("expression", ["*/20 * * * *", "0 * * * *", "*/7 1-3 * * *", "*/20 2 * * *"])
def test_wildcard_jobs_follow_the_clock_in_real_time(expression: str, timezone: str) -> None:
    """Every instant whose wall-clock time matches fires: the repeated hour again, the skipped one never."""
    cron = CronSchedule(expression, timezone)
    assert cron.wildcard
    for change in TRANSITIONS[timezone]:
        start, end = change - timedelta(hours=5), change + timedelta(hours=5)
        ticks = list(cron.ticks(start, end))
        assert ticks == vixie_fires(expression, timezone, start, end), (expression, timezone, change)
        assert len({cron.local_stamp(t) for t in ticks}) == len(ticks)
        assert [cron.last_at_or_before(t, not_before=start) for t in ticks] == ticks
        step = {"*/20 * * * *": timedelta(minutes=20), "0 * * * *": timedelta(hours=1)}.get(expression)
        if step is not None and not timezone.endswith("Lord_Howe"):  # whole-hour changes: a steady beat
            assert all(later - earlier == step for earlier, later in pairwise(ticks))


@pytest.mark.parametrize("timezone", list(TRANSITIONS))
def test_fixed_time_jobs_follow_the_wall_clock(timezone: str) -> None:
    """Skipped times fire once at the change; repeated times fire once, at their first occurrence."""
    spring, fall = TRANSITIONS[timezone]
    for expression in ("30 2 * * *", "0,30 2 * * *", "15 2 * * *", "0 1-3 * * *", "45 1 * * *"):
        cron = CronSchedule(expression, timezone)
        assert not cron.wildcard
        for change in (spring, fall):
            start, end = change - timedelta(hours=12), change + timedelta(hours=12)
            ticks = list(cron.ticks(start, end))
            assert ticks == vixie_fires(expression, timezone, start, end), (expression, change)
            assert [cron.last_at_or_before(t, not_before=start) for t in ticks] == ticks
        # 02:00-02:15 is skipped everywhere (02:00-02:59 where the change is an hour)
        if expression == "15 2 * * *":
            assert list(cron.ticks(spring - timedelta(hours=2), spring)) == [spring]


def test_a_fixed_time_skipped_by_spring_forward_fires_at_the_change_in_new_york() -> None:
    cron = CronSchedule("0,30 2 * * *", "America/New_York")
    ticks = list(cron.ticks(utc(2026, 3, 7, 12), utc(2026, 3, 9, 12)))
    # 02:00 and 02:30 do not exist on 2026-03-08: one tick at 03:00 EDT, the clocks' change
    assert [cron.local_stamp(t) for t in ticks] == ["20260308T0300", "20260309T0200", "20260309T0230"]
    assert ticks[0] == utc(2026, 3, 8, 7)


def test_no_burst_when_lord_howe_springs_forward_half_an_hour() -> None:
    """Before: the skipped 02:00 and 02:20 were shifted to 02:30 and 02:50 and fired between the others."""
    cron = CronSchedule("*/20 * * * *", "Australia/Lord_Howe")
    ticks = list(cron.ticks(utc(2026, 10, 3, 15), utc(2026, 10, 3, 16, 20)))
    assert [cron.local_stamp(t)[9:] for t in ticks] == ["0140", "0240", "0300", "0320"]
    assert ticks == [
        utc(2026, 10, 3, 15, 10),
        utc(2026, 10, 3, 15, 40),
        utc(2026, 10, 3, 16),
        utc(2026, 10, 3, 16, 20),
    ]


def test_changes_of_three_hours_are_clock_jumps_forward_but_daylight_saving_back() -> None:
    """Vixie's limit: a wall clock moving more than 180 minutes in one minute jumped (nothing made up).

    Antarctica/Casey: 2011-10-28 02:00 +08 -> 05:00 +11 (a jump: the 02:30 job skips that day) and
    2012-02-22 04:00 +11 -> 01:00 +08 (179 minutes back: it still fires once). Pacific/Apia
    skipped 2011-12-30 (-10:00 -> +14:00): the noon job does not make up the lost day.
    """
    casey = CronSchedule("30 2 * * *", "Antarctica/Casey")
    start, end = utc(2011, 10, 26), utc(2011, 10, 30)
    assert [casey.local_stamp(t) for t in casey.ticks(start, end)] == [
        "20111027T0230", "20111029T0230", "20111030T0230"
    ]  # fmt: skip
    assert list(casey.ticks(start, end)) == vixie_fires("30 2 * * *", "Antarctica/Casey", start, end)
    start, end = utc(2012, 2, 20), utc(2012, 2, 23)
    assert [casey.local_stamp(t) for t in casey.ticks(start, end)] == [
        "20120221T0230", "20120222T0230", "20120223T0230"
    ]  # fmt: skip
    assert list(casey.ticks(start, end)) == vixie_fires("30 2 * * *", "Antarctica/Casey", start, end)
    apia = CronSchedule("0 12 * * *", "Pacific/Apia")
    start, end = utc(2011, 12, 28), utc(2012, 1, 2)
    assert [apia.local_stamp(t) for t in apia.ticks(start, end)] == [
        "20111228T1200", "20111229T1200", "20111231T1200", "20120101T1200", "20120102T1200"
    ]  # fmt: skip
    assert list(apia.ticks(start, end)) == vixie_fires("0 12 * * *", "Pacific/Apia", start, end)


def test_wildcard_classification_is_vixies() -> None:
    wild = ["* * * * *", "*/20 * * * *", "0 * * * *", "*/7 1-3 * * *", "0 */2 * * *", "30 * * * 1"]
    fixed = ["30 2 * * *", "0 1-3 * * *", "0-59 2 * * *", "0,30 9 * * 1-5", "15 0 1 * *"]
    assert [is_wildcard(e) for e in wild] == [True] * len(wild)
    assert [is_wildcard(e) for e in fixed] == [False] * len(fixed)


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


def test_the_last_tick_of_a_yearly_job_keeps_the_summer_offset_it_fired_under() -> None:
    """Searching back from winter across the previous year's clock changes (July 1st, 03:00 CEST)."""
    cron = CronSchedule("0 3 1 7 *", "Europe/Berlin")
    assert cron.last_at_or_before(utc(2024, 1, 15), not_before=utc(2023, 1, 1)) == utc(2023, 7, 1, 1)
    assert cron.next_after(utc(2023, 12, 1)) == utc(2024, 7, 1, 1)


def test_a_made_up_tick_before_the_window_is_not_the_last_one_in_it() -> None:
    """02:30 on 2024-03-31 in Berlin is made up at the change (01:00 UTC): outside (01:05, 01:10]."""
    cron = CronSchedule("30 2 * * *", "Europe/Berlin")
    assert cron.last_at_or_before(utc(2024, 3, 31, 1, 10), not_before=utc(2024, 3, 31, 0, 55)) == utc(
        2024, 3, 31, 1
    )
    assert cron.last_at_or_before(utc(2024, 3, 31, 1, 10), not_before=utc(2024, 3, 31, 1, 5)) is None


def test_a_zone_at_utc_plus_zero_keeps_its_weekdays_and_made_up_ticks() -> None:
    """Europe/London is at +00:00 in winter: an offset of zero is an offset, not a missing one
    (mutant: read as missing, the Monday job fired on Sundays and the skipped 01:30 was lost)."""
    weekly = CronSchedule("30 9 * * 1", "Europe/London")
    assert weekly.next_after(utc(2026, 1, 10)) == utc(2026, 1, 12, 9, 30)  # Monday 09:30 GMT
    assert weekly.last_at_or_before(utc(2026, 1, 14), not_before=utc(2026, 1, 1)) == utc(2026, 1, 12, 9, 30)
    assert weekly.next_after(utc(2026, 7, 10)) == utc(2026, 7, 13, 8, 30)  # Monday 09:30 BST
    daily = CronSchedule("30 1 * * *", "Europe/London")  # 01:30 does not exist on 2026-03-29
    assert list(daily.ticks(utc(2026, 3, 28, 23), utc(2026, 3, 29, 3))) == [utc(2026, 3, 29, 1)]


def test_the_last_tick_uses_the_offset_in_force_years_after_a_zone_changed_its_rules() -> None:
    """Europe/Istanbul has kept +03 since 2016-09-07: searching back from 2017 finds that change in
    the year before, from 2018 a search bound (mutants: the wrong year searched, or the bound a year
    too early: the tick came out with 2016's winter +02, before the window, and was dropped)."""
    for monday in (utc(2017, 1, 9, 6, 30), utc(2018, 1, 8, 6, 30)):  # 09:30 +03
        window = monday - timedelta(days=1)
        # a fresh schedule each time: what one search found is kept for the next
        last = CronSchedule("30 9 * * 1", "Europe/Istanbul").last_at_or_before
        assert last(monday + timedelta(hours=12), not_before=window) == monday
        assert CronSchedule("30 9 * * 1", "Europe/Istanbul").next_after(window) == monday
