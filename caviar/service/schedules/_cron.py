"""Cron arithmetic in a schedule's own timezone, with Vixie (Debian) cron's daylight-saving rule.

A cron expression is matched against the *local wall-clock time* of its timezone, as cron does.
When the clocks change (a UTC offset transition, found with :mod:`zoneinfo`), caviar decides as
Vixie cron 4.1 (the cron of Debian and most Linux systems) does, by the kind of expression:

* **Wildcard jobs**: the minute field or the hour field begins with ``*`` (``*/20 * * * *``,
  ``0 * * * *``, ``*/7 1-3 * * *``; Vixie's ``MIN_STAR``/``HR_STAR`` flags). They fire at every
  instant at which the local clock shows a matching time, so they keep running in real time: a
  wall-clock time repeated when the clocks fall back fires again (``*/20 * * * *`` in
  Europe/Berlin fires every 20 minutes of UTC through 2026-10-25, no 80-minute gap; ``0 * * * *``
  fires at 00:00, 01:00 and 02:00 UTC), and a wall-clock time skipped when the clocks spring
  forward does not fire (no burst: ``*/20`` fires at 01:40 CET, then at 03:00 CEST, 20 minutes
  later).
* **Fixed-time jobs**: every other expression (specific minutes *and* hours, ranges and lists
  included: ``30 2 * * *``, ``0 1-3 * * *``, ``0,30 9 * * 1-5``). They follow the wall clock:
  a time skipped when the clocks spring forward fires once, at the first instant after the gap
  (the transition itself: a 02:30 job in Europe/Berlin fires at 03:00 CEST = 01:00 UTC on the
  last Sunday of March; several skipped times make one tick); a time repeated when the clocks
  fall back fires once, at its first occurrence (02:30 CEST = 00:30 UTC on the last Sunday of
  October, not again at 02:30 CET).
* Both special cases are Vixie's handling of clock changes "of less than 3 hours". Exactly as
  cron.c decides: a change of the offset by ``d`` minutes makes the wall clock move ``d + 1``
  minutes in one real minute (Vixie's ``timeDiff``). Forward by 6 to 180 (changes from 5 minutes
  to 2 h 59 min): the rules above. Forward by 2 to 5 (changes under 5 minutes, found only in old
  zone history): every skipped minute is caught up at the change, wildcard jobs' too. Back by
  up to 180 (changes up to 3 h 01 min): fixed-time jobs do not repeat. Beyond 180 either way the
  clock *jumped* (Pacific/Apia skipping 2011-12-30; Antarctica/Casey's 3-hour summer time
  starting in 2011): every job follows the new wall clock at once, skipped times are not made
  up and repeated times fire again.

Ticks are UTC instants, strictly increasing. Two ticks can show the same local time only in a
repeated hour (wildcard jobs); :meth:`CronSchedule.local_stamp` marks the later one with ``-2``
so study names stay unique.

Implementation: the UTC time line is cut at the zone's offset changes (found by probing each
hour of a year and bisecting to the second; cached per zone and year). Within a piece the
offset is constant, so croniter's matches on naive local times map one to one onto UTC; the
rules above decide what happens at the cuts.
"""

from __future__ import annotations

import bisect
import functools
import zoneinfo
from collections.abc import Iterator
from datetime import MAXYEAR, MINYEAR, UTC, datetime, timedelta

from croniter import croniter

MAX_SEARCH = 100_000
"""Steps (matches or offset changes) examined before giving up (far more than any valid schedule needs)."""
CLOCK_JUMP_MINUTES = 180
"""Vixie's ``timeDiff`` beyond which a change of the clock is a jump, not daylight saving."""
CATCH_UP_MINUTES = 5
"""Vixie's ``timeDiff`` up to which every skipped minute is caught up, wildcard jobs too."""
_MINUTE = timedelta(minutes=1)
_TINY = timedelta(microseconds=1)
_PROBE_S = 3600  # offset changes are at least this far apart in every zone


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


def is_wildcard(expression: str) -> bool:
    """Vixie cron's wildcard job: the minute or the hour field begins with ``*``."""
    minute, hour = expression.split()[:2]
    return minute.startswith("*") or hour.startswith("*")


class _Change:
    """A cut of the UTC time line: the offset before and from ``at`` (equal for a mere search bound)."""

    __slots__ = ("after", "at", "before")

    def __init__(self, at: datetime, before: timedelta, after: timedelta) -> None:
        self.at, self.before, self.after = at, before, after

    @property
    def jump(self) -> timedelta:
        return self.after - self.before


def _offset_at(zone: zoneinfo.ZoneInfo, timestamp: int) -> timedelta:
    return datetime.fromtimestamp(timestamp, zone).utcoffset() or timedelta(0)


@functools.lru_cache(maxsize=512)
def _changes_in_year(zone: zoneinfo.ZoneInfo, year: int) -> tuple[_Change, ...]:
    """The offset changes of ``zone`` in ``(Jan 1 of year, Jan 1 of year + 1]`` (UTC), oldest first."""
    start = int(datetime(year, 1, 1, tzinfo=UTC).timestamp())
    end = int(datetime(year + 1, 1, 1, tzinfo=UTC).timestamp())
    changes: list[_Change] = []
    low, low_offset = start, _offset_at(zone, start)
    while low < end:
        high = min(low + _PROBE_S, end)
        high_offset = _offset_at(zone, high)
        if high_offset != low_offset:
            lo, hi = low, high  # offset(lo) is the old one, offset(hi) the new one: bisect to the second
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if _offset_at(zone, mid) == low_offset else (lo, mid)
            changes.append(_Change(datetime.fromtimestamp(hi, UTC), low_offset, high_offset))
        low, low_offset = high, high_offset
    return tuple(changes)


class CronSchedule:
    """A cron expression in a timezone: the UTC instants at which it fires (see the module doc).

    Args:
        expression: a valid 5-field cron expression (see :func:`check_cron`).
        timezone: an IANA timezone name.
    """

    def __init__(self, expression: str, timezone: str) -> None:
        self.expression = check_cron(expression)
        self.zone = parse_timezone(timezone)
        self.wildcard = is_wildcard(self.expression)

    # ---- the zone's offset changes -------------------------------------------------------

    def _offset(self, moment: datetime) -> timedelta:
        return moment.astimezone(self.zone).utcoffset() or timedelta(0)

    def _bound(self, at: datetime) -> _Change:
        """A cut at ``at`` that only bounds a search (or a real change, if one falls there)."""
        return _Change(at, self._offset(at - _TINY), self._offset(at))

    def _changes(self, year: int) -> tuple[_Change, ...]:
        return _changes_in_year(self.zone, year) if MINYEAR < year < MAXYEAR else ()

    def _next_change(self, moment: datetime) -> _Change:
        """The first cut strictly after ``moment``: an offset change within two years, else a bound."""
        for year in (moment.year, moment.year + 1):
            changes = self._changes(year)
            index = bisect.bisect_right([c.at for c in changes], moment)
            if index < len(changes):
                return changes[index]
        if moment.year + 2 > MAXYEAR:
            raise CronError(f"cron expression {self.expression!r} has no tick after {moment.isoformat()}")
        return self._bound(datetime(moment.year + 2, 1, 1, tzinfo=UTC))

    def _last_change(self, moment: datetime, *, strict: bool) -> _Change:
        """The last cut at or before ``moment`` (before it, if ``strict``), else a bound."""
        for year in (moment.year, moment.year - 1):
            changes = self._changes(year)
            at = [c.at for c in changes]
            index = (bisect.bisect_left(at, moment) if strict else bisect.bisect_right(at, moment)) - 1
            if index >= 0:
                return changes[index]
        if moment.year - 1 <= MINYEAR:
            raise CronError(f"cron expression {self.expression!r} has no tick before {moment.isoformat()}")
        return self._bound(datetime(moment.year - 1, 1, 1, tzinfo=UTC))

    # ---- the rule at a change ------------------------------------------------------------

    def _match(self, local: datetime, *, forward: bool) -> datetime:
        """croniter's next (``forward``) or previous match strictly beyond the naive ``local``."""
        try:
            matches = croniter(self.expression, local)
            return matches.get_next(datetime) if forward else matches.get_prev(datetime)
        except Exception:  # croniter's errors at the ends of the calendar: no further tick
            raise CronError(
                f"cron expression {self.expression!r} has no tick near {local.isoformat()}"
            ) from None

    def _made_up(self, change: _Change) -> bool:
        """Whether the job fires at ``change`` for wall-clock times the clocks skipped there."""
        diff = _time_diff(change.jump)
        if diff <= 1 or diff > CLOCK_JUMP_MINUTES or (self.wildcard and diff > CATCH_UP_MINUTES):
            return False
        skipped_from = _naive(change.at + change.before)
        return self._match(skipped_from - _TINY, forward=True) < _naive(change.at + change.after)

    def _repeated(self, local: datetime, tick: datetime) -> bool:
        """Whether a fixed-time job skips ``tick``: an earlier instant showed its wall-clock time."""
        if self.wildcard:
            return False
        first = local.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        return first < tick and _time_diff(first - tick) >= -CLOCK_JUMP_MINUTES

    # ---- ticks ---------------------------------------------------------------------------

    def next_after(self, after: datetime) -> datetime:
        """The first tick strictly after ``after`` (an aware datetime), in UTC.

        Raises:
            CronError: no tick within the search limit.
        """
        moment, strict = after.astimezone(UTC), True
        for _ in range(MAX_SEARCH):
            change = self._next_change(moment)  # the offset is change.before up to it
            local = _naive(moment + change.before)
            match = self._match(local if strict else local - _TINY, forward=True)
            tick = (match - change.before).replace(tzinfo=UTC)
            if tick < change.at:
                if not self._repeated(match, tick):
                    return tick
                moment, strict = tick, True
                continue
            if self._made_up(change):
                return change.at
            moment, strict = change.at, False
        raise CronError(f"cron expression {self.expression!r} has no tick after {after.isoformat()}")

    def ticks(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """The ticks in ``(after, until]``, in UTC, oldest first."""
        tick = self.next_after(after)
        while tick <= until:
            yield tick
            tick = self.next_after(tick)

    def last_at_or_before(self, moment: datetime, *, not_before: datetime) -> datetime | None:
        """The latest tick in ``[not_before, moment]`` (None when there is none)."""
        moment, strict = moment.astimezone(UTC), False
        for _ in range(MAX_SEARCH):
            if moment < not_before or (strict and moment == not_before):
                return None
            change = self._last_change(moment, strict=strict)  # the offset is change.after from it
            local = _naive(moment + change.after)
            match = self._match(local if strict else local + _TINY, forward=False)
            tick = (match - change.after).replace(tzinfo=UTC)
            if tick >= change.at:
                if not self._repeated(match, tick):
                    return tick if tick >= not_before else None
                moment, strict = tick, True
                continue
            if self._made_up(change):
                return change.at if change.at >= not_before else None
            moment, strict = change.at, True
        return None

    def local_stamp(self, tick: datetime) -> str:
        """``YYYYmmddTHHMM`` of ``tick`` in the schedule's timezone (the study name suffix).

        The second instant showing a repeated wall-clock time (wildcard jobs, when the clocks
        fall back) gets ``-2`` appended, so the two ticks make two differently named studies.
        """
        local = tick.astimezone(self.zone)
        stamp = local.strftime("%Y%m%dT%H%M")
        return f"{stamp}-2" if local.replace(fold=0).astimezone(UTC) < tick else stamp


def _time_diff(jump: timedelta) -> int:
    """Vixie's ``timeDiff`` at a change of offset by ``jump``: wall-clock minutes passed in one minute."""
    return jump // _MINUTE + 1


def _naive(moment: datetime) -> datetime:
    """The wall-clock reading of a UTC datetime already shifted by its offset."""
    return moment.replace(tzinfo=None)
