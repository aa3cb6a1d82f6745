"""Cron arithmetic in a schedule's own timezone, DST included.

Schedules follow *wall-clock* time: the cron expression is matched against naive local times
(croniter on naive datetimes), and each match is then placed on the UTC time line with
:mod:`zoneinfo`:

* A local time that does not exist (the hour skipped when clocks spring forward) fires once,
  shifted forward by the length of the gap: a 02:30 daily schedule in Europe/Berlin fires at
  03:30 local time (01:30 UTC) on the last Sunday of March. This is ``fold=0`` of PEP 495.
* A local time that happens twice (the hour repeated when clocks fall back) fires once, at its
  first occurrence (summer time): 02:30 CEST (00:30 UTC) on the last Sunday of October.
* Ticks are strictly increasing in UTC: a shifted time that lands on or before the previous
  tick (sub-hourly schedules inside the gap) is dropped, so no instant fires twice.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from croniter import croniter

MAX_SEARCH = 100_000
"""Wall-clock matches examined before giving up (far more than any valid schedule needs)."""
_LOOKBACK = timedelta(hours=26)
_MARGIN = timedelta(minutes=1)


class CronError(ValueError):
    """An invalid cron expression or timezone (the message says why)."""


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def parse_timezone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA timezone ``name`` (``Europe/Berlin``, ``UTC``).

    Raises:
        CronError: the name is not an IANA timezone known to this system.
    """
    if name not in _zones() and name != "UTC":
        raise CronError(f"unknown timezone {name!r} (expected an IANA name such as 'Europe/Berlin')")
    return zoneinfo.ZoneInfo(name)


def check_cron(expression: str) -> str:
    """Validate a 5-field cron expression (minute hour day-of-month month day-of-week).

    Returns:
        The expression with its fields separated by single spaces.

    Raises:
        CronError: not 5 fields, a field croniter rejects, or an expression that never fires.
    """
    fields = expression.split()
    if len(fields) != 5:
        raise CronError(
            f"cron expression {expression!r} must have 5 fields "
            f"(minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    normalized = " ".join(fields)
    if not croniter.is_valid(normalized):
        raise CronError(f"invalid cron expression {expression!r}")
    try:
        croniter(normalized, datetime(2000, 1, 1)).get_next(datetime)
    except Exception:  # croniter raises several error types on impossible dates (30 2 = Feb 30)
        raise CronError(f"cron expression {expression!r} never fires") from None
    return normalized


class CronSchedule:
    """A cron expression in a timezone: the UTC instants at which it fires.

    Args:
        expression: a valid 5-field cron expression (see :func:`check_cron`).
        timezone: an IANA timezone name.
    """

    def __init__(self, expression: str, timezone: str) -> None:
        self.expression = check_cron(expression)
        self.zone = parse_timezone(timezone)

    def _to_utc(self, local_naive: datetime) -> datetime:
        return local_naive.replace(tzinfo=self.zone, fold=0).astimezone(UTC)

    def _local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone).replace(tzinfo=None, fold=0)

    def _recent_jump(self, moment: datetime) -> timedelta:
        """The change of UTC offset if the clocks jumped within that much time before ``moment``.

        Positive after a jump forward (the gap's wall-clock times map to just after it),
        negative after a jump back (the repeated wall-clock times), zero otherwise: then wall
        clock and UTC agree in order around ``moment`` and no extra matches need examining.
        """
        offset = moment.astimezone(self.zone).utcoffset() or timedelta(0)
        earlier = (moment - _LOOKBACK).astimezone(self.zone).utcoffset() or timedelta(0)
        jump = offset - earlier
        if not jump:
            return jump
        just_before = (moment - abs(jump) - _MARGIN).astimezone(self.zone).utcoffset() or timedelta(0)
        return jump if just_before != offset else timedelta(0)

    def _in_gap(self, local_naive: datetime) -> bool:
        return self._local(self._to_utc(local_naive)) != local_naive

    def next_after(self, after: datetime) -> datetime:
        """The first tick strictly after ``after`` (an aware datetime), in UTC.

        Raises:
            CronError: no tick within the search limit.
        """
        slack = max(self._recent_jump(after), timedelta(0))
        matches = croniter(self.expression, self._local(after) - slack - _MARGIN)
        best: datetime | None = None
        horizon: datetime | None = None
        for _ in range(MAX_SEARCH):
            local = matches.get_next(datetime)
            if horizon is not None and local >= horizon:
                break
            tick = self._to_utc(local)
            if tick > after and (best is None or tick < best):
                best = tick
                if horizon is None and not self._in_gap(local):
                    break  # wall clock and UTC agree in order from here on
                # a time in a gap maps past later wall-clock times: look one gap further
                horizon = horizon or local + abs(self._recent_jump(tick)) + _MARGIN
        if best is None:
            raise CronError(f"cron expression {self.expression!r} has no tick after {after.isoformat()}")
        return best

    def ticks(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """The ticks in ``(after, until]``, in UTC, oldest first."""
        tick = self.next_after(after)
        while tick <= until:
            yield tick
            tick = self.next_after(tick)

    def last_at_or_before(self, moment: datetime, *, not_before: datetime) -> datetime | None:
        """The latest tick in ``[not_before, moment]`` (None when there is none)."""
        slack = max(-self._recent_jump(moment), timedelta(0))
        matches = croniter(self.expression, self._local(moment) + slack + _MARGIN)
        floor = self._local(not_before) - abs(self._recent_jump(not_before)) - _MARGIN
        for _ in range(MAX_SEARCH):
            local = matches.get_prev(datetime)
            if local < floor:
                return None
            tick = self._to_utc(local)
            if tick <= moment:  # descending wall clock maps to descending UTC below ``moment``
                return tick if tick >= not_before else None
        return None

    def local_stamp(self, tick: datetime) -> str:
        """``YYYYmmddTHHMM`` of ``tick`` in the schedule's timezone (the study name suffix)."""
        return tick.astimezone(self.zone).strftime("%Y%m%dT%H%M")
