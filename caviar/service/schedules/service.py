"""Schedule operations and the scheduler: plain functions over a :class:`~service.db.Database`.

Firing exactly once across replicas: every replica runs :func:`fire_due` on its own timer. A
due schedule is claimed by compare-and-set on its row (``UPDATE ... SET next_run_at = :new
WHERE id = :id AND next_run_at = :old``); only the replica whose update changed the row
(rowcount 1) records the run and creates the study. The unique ``(schedule_id, tick_at)``
constraint of the runs table is the backstop, and the study name (``<schedule>-<tick>``) is
unique as well. A run is recorded as ``pending`` in the claiming transaction and finished once
the study exists; a replica that died in between leaves a ``pending`` run that any replica
finishes after :data:`PENDING_TIMEOUT`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from caviar.service.background import PeriodicTask
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.definition import StudyDefinition, StudyTemplate
from caviar.service.errors import (
    CaviarError,
    Conflict,
    InvalidInput,
    NotFound,
    invalid_from_pydantic,
    parse_model,
)
from caviar.service.schedules._cron import CronError, CronSchedule
from caviar.service.schedules.schemas import (
    ScheduleCreate,
    ScheduleList,
    ScheduleRead,
    ScheduleRunList,
    ScheduleRunRead,
    ScheduleUpdate,
)
from caviar.service.store import QUEUE_STATES, check_data_access, create_study
from caviar.service.types import INT32_MAX
from caviar.storage import Schedule, ScheduleRun, StudyRecord, utcnow

_log = logging.getLogger("caviar.scheduler")

DEFAULT_GRACE = timedelta(seconds=60)
"""A tick fired later than this after its time counts as missed (see the misfire policy)."""
PENDING_TIMEOUT = timedelta(minutes=5)
"""A run still ``pending`` this long after its claim is finished by whichever replica sees it."""
MISSED_COUNT_CAP = 10_000
"""Missed ticks are counted up to this many for the run's message."""

clock: Callable[[], datetime] = utcnow
"""The scheduler loop's clock (tests replace it; :func:`fire_due` itself takes ``now``)."""


def parse_create(data: Any) -> ScheduleCreate:
    """Validate a new schedule from JSON/YAML data; errors name the field."""
    return parse_model(ScheduleCreate, data)


def parse_update(data: Any) -> ScheduleUpdate:
    """Validate a schedule change from JSON/YAML data; errors name the field."""
    return parse_model(ScheduleUpdate, data)


def tick_study_name(schedule_name: str, cron: CronSchedule, tick: datetime) -> str:
    """``<schedule>-<YYYYmmddTHHMM>``: the study of a tick, stamped in the schedule's timezone."""
    return f"{schedule_name}-{cron.local_stamp(tick)}"


def manual_study_name(schedule_name: str, cron: CronSchedule, moment: datetime) -> str:
    """``<schedule>-manual-<YYYYmmddTHHMMSS>``: the study of a manual run."""
    return f"{schedule_name}-manual-{moment.astimezone(cron.zone).strftime('%Y%m%dT%H%M%S')}"


def check_template(schedule_name: str, template: dict[str, Any], *, data_files: bool = True) -> None:
    """Validate a template, and that the studies it stamps out are valid definitions.

    Raises:
        InvalidInput: the failing field, prefixed ``template.`` (``template.search_space.lr.low``);
            ``file_datasets_disabled`` (see :func:`~caviar.service.store.check_data_access`).
    """
    try:
        parsed = StudyTemplate.model_validate(template)
        StudyDefinition.from_template(f"{schedule_name}-manual-00000000T000000", template)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc.errors(), prefix="template") from None
    check_data_access(parsed, data_files=data_files)


def _check_end(end_at: datetime | None, now: datetime) -> None:
    """A schedule that ends in the past would never fire: refuse it (422)."""
    if end_at is not None and end_at <= now:
        raise InvalidInput(
            "end_at: must be in the future", details=[{"field": "end_at", "message": "in the past"}]
        )


def _cron_of(cron: str, timezone: str) -> CronSchedule:
    try:
        return CronSchedule(cron, timezone)
    except CronError as exc:
        raise InvalidInput(str(exc), details=[{"field": "cron", "message": str(exc)}]) from None


def _next_tick(schedule: Schedule, cron: CronSchedule, after: datetime, run_count: int) -> datetime | None:
    """The next tick after ``after``; None when disabled, past ``end_at`` or out of runs."""
    if not schedule.enabled or (schedule.max_runs is not None and run_count >= schedule.max_runs):
        return None
    try:
        tick = cron.next_after(after)
    except CronError:
        return None
    if schedule.end_at is not None and tick > schedule.end_at:
        return None
    return tick


def _read(schedule: Schedule) -> ScheduleRead:
    return ScheduleRead.model_validate(schedule, from_attributes=True)


def get_schedule(session: Session, ref: str | int) -> Schedule:
    """A schedule by id or name.

    Raises:
        NotFound: ``schedule_not_found``.
    """
    schedule = None
    text = str(ref)
    if text.isascii() and text.isdigit() and int(text) <= INT32_MAX:  # not "²", nothing past int32
        schedule = session.get(Schedule, int(text))
    if schedule is None:
        schedule = session.scalar(select(Schedule).where(Schedule.name == text))
    if schedule is None:
        raise NotFound(f"no schedule {text!r}", code="schedule_not_found")
    return schedule


def show_schedule(db: Database, ref: str | int) -> ScheduleRead:
    """One schedule by id or name."""
    with db.session() as session:
        return _read(get_schedule(session, ref))


def list_schedules(db: Database, *, limit: int = 100, offset: int = 0) -> ScheduleList:
    """Schedules in order of creation."""
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(Schedule)) or 0
        rows = session.scalars(select(Schedule).order_by(Schedule.id).limit(limit).offset(offset))
        return ScheduleList(items=[_read(s) for s in rows], total=total)


def create_schedule(
    db: Database, spec: ScheduleCreate, *, now: datetime | None = None, data_files: bool = True
) -> ScheduleRead:
    """Create a schedule; its first tick is the first one after ``now``.

    Raises:
        InvalidInput: an invalid template (fields prefixed ``template.``), or a ``file:`` dataset
            where ``data_files`` is false.
        Conflict: ``name_taken`` when a schedule has the name already.
    """
    now = now or utcnow()
    check_template(spec.name, spec.template, data_files=data_files)
    _check_end(spec.end_at, now)
    cron = _cron_of(spec.cron, spec.timezone)
    schedule = Schedule(
        name=spec.name,
        cron=cron.expression,
        timezone=spec.timezone,
        template=spec.template,
        enabled=spec.enabled,
        misfire=spec.misfire,
        overlap=spec.overlap,
        end_at=spec.end_at,
        max_runs=spec.max_runs,
        run_count=0,
        created_at=now,
        updated_at=now,
    )
    schedule.next_run_at = _next_tick(schedule, cron, now, 0)
    taken = Conflict(f"a schedule named {spec.name!r} already exists", code="name_taken")
    try:
        with db.session() as session, session.begin():
            if session.scalar(select(Schedule.id).where(Schedule.name == spec.name)) is not None:
                raise taken
            session.add(schedule)
    except IntegrityError:
        raise taken from None
    return _read(schedule)


_NOT_NULL = ("cron", "timezone", "template", "enabled", "misfire", "overlap")


def update_schedule(
    db: Database,
    ref: str | int,
    change: ScheduleUpdate,
    *,
    now: datetime | None = None,
    data_files: bool = True,
) -> ScheduleRead:
    """Change a schedule; the next tick is recomputed from ``now`` when its timing changed.

    Enabling a schedule starts from the next tick after ``now`` (ticks while it was disabled are
    not misfires); disabling clears ``next_run_at``.

    Raises:
        NotFound: no such schedule.
        InvalidInput: a null for a required field, an invalid cron/timezone/template.
    """
    now = now or utcnow()
    given = change.model_fields_set
    for field in _NOT_NULL:
        if field in given and getattr(change, field) is None:
            raise InvalidInput(f"{field}: may not be null", details=[{"field": field, "message": "null"}])
    with db.session() as session, session.begin():
        schedule = get_schedule(session, ref)
        if change.template is not None:
            check_template(schedule.name, change.template, data_files=data_files)
        if "end_at" in given:
            _check_end(change.end_at, now)
        for field in given:
            setattr(schedule, field, getattr(change, field))
        cron = _cron_of(schedule.cron, schedule.timezone)
        schedule.cron = cron.expression
        if given & {"cron", "timezone", "enabled", "end_at", "max_runs"}:
            schedule.next_run_at = _next_tick(schedule, cron, now, schedule.run_count)
        schedule.updated_at = now
        return _read(schedule)


def delete_schedule(db: Database, ref: str | int) -> None:
    """Delete a schedule and its run history; the studies it created stay."""
    with db.session() as session, session.begin():
        session.delete(get_schedule(session, ref))


def _run_read(run: ScheduleRun, study_state: str | None) -> ScheduleRunRead:
    return ScheduleRunRead(
        id=run.id,
        schedule_id=run.schedule_id,
        tick_at=run.tick_at,
        fired_at=run.fired_at,
        study_name=run.study_name,
        study_state=study_state,
        outcome=run.outcome,
        message=run.message,
        manual=run.manual,
    )


def _with_states(session: Session, runs: list[ScheduleRun]) -> list[ScheduleRunRead]:
    names = {r.study_name for r in runs if r.study_name}
    states = dict(
        session.execute(select(StudyRecord.name, StudyRecord.state).where(StudyRecord.name.in_(names))).all()
    )
    return [_run_read(r, states.get(r.study_name) if r.study_name else None) for r in runs]


def list_runs(db: Database, ref: str | int, *, limit: int = 100, offset: int = 0) -> ScheduleRunList:
    """A schedule's runs, newest tick first, each with its study's live state."""
    with db.session() as session:
        schedule = get_schedule(session, ref)
        where = ScheduleRun.schedule_id == schedule.id
        total = session.scalar(select(func.count()).select_from(ScheduleRun).where(where)) or 0
        query = select(ScheduleRun).where(where).order_by(ScheduleRun.tick_at.desc(), ScheduleRun.id.desc())
        runs = list(session.scalars(query.limit(limit).offset(offset)))
        return ScheduleRunList(items=_with_states(session, runs), total=total)


def run_now(db: Database, ref: str | int, *, now: datetime | None = None) -> ScheduleRunRead:
    """Create the schedule's study now (a manual run, recorded with ``manual: true``).

    Manual runs ignore ``enabled``, the overlap policy and ``max_runs``, and leave the next tick
    alone.

    Raises:
        NotFound: no such schedule.
        Conflict: ``name_taken`` when a study of that name exists (two manual runs in one second).
    """
    now = now or utcnow()
    schedule = show_schedule(db, ref)
    cron = _cron_of(schedule.cron, schedule.timezone)
    name = manual_study_name(schedule.name, cron, now)
    try:
        definition = StudyDefinition.from_template(name, schedule.template)
    except ValidationError as exc:
        raise invalid_from_pydantic(exc.errors(), prefix="template") from None
    create_study(db, definition, schedule_id=schedule.id)
    run = ScheduleRun(
        schedule_id=schedule.id, tick_at=now, fired_at=now, study_name=name, outcome="created", manual=True
    )
    with db.session() as session, session.begin():
        session.add(run)
    _log.info("schedule %s: manual run created study %s", schedule.name, name)
    return _run_read(run, "queued")


def _finish(db: Database, run_id: int, schedule_id: int, template: dict[str, Any], name: str) -> None:
    """Create the study of a pending run and record the outcome (``created`` or ``error``)."""
    outcome, message = "created", None
    try:
        create_study(db, StudyDefinition.from_template(name, template), schedule_id=schedule_id)
    except ValidationError as exc:
        outcome, message = "error", invalid_from_pydantic(exc.errors(), prefix="template").message
    except CaviarError as exc:
        with db.session() as session:
            mine = session.scalar(select(StudyRecord.schedule_id).where(StudyRecord.name == name))
        if not (exc.code == "name_taken" and mine == schedule_id):  # else: created before a crash
            outcome, message = "error", exc.message
    except Exception as exc:
        _log.exception("schedule run %s: creating study %s failed", run_id, name)
        outcome, message = "error", f"could not create the study ({type(exc).__name__}; see the server log)"
    with db.session() as session, session.begin():
        session.execute(
            update(ScheduleRun)
            .where(ScheduleRun.id == run_id, ScheduleRun.outcome == "pending")
            .values(outcome=outcome, message=message)
        )


def _recover_pending(db: Database, now: datetime) -> None:
    with db.session() as session:
        rows = session.execute(
            select(ScheduleRun.id, ScheduleRun.schedule_id, ScheduleRun.study_name, Schedule.template)
            .join(Schedule, Schedule.id == ScheduleRun.schedule_id)
            .where(ScheduleRun.outcome == "pending", ScheduleRun.fired_at < now - PENDING_TIMEOUT)
        ).all()
    for run_id, schedule_id, name, template in rows:
        _log.warning("schedule run %s (study %s) was left pending; finishing it", run_id, name)
        _finish(db, run_id, schedule_id, template, name)


def _overlapping(db: Database, schedule_id: int) -> str | None:
    """The name of a study of this schedule still queued or running, if any."""
    with db.session() as session:
        return session.scalar(
            select(StudyRecord.name)
            .where(StudyRecord.schedule_id == schedule_id, StudyRecord.state.in_(QUEUE_STATES))
            .order_by(StudyRecord.created_at.desc())
            .limit(1)
        )


def _fire_one(db: Database, schedule: Schedule, now: datetime, grace: timedelta) -> list[ScheduleRun]:
    """Claim the due ticks of one schedule by compare-and-set and record what comes of them."""
    old = schedule.next_run_at
    assert old is not None  # selected by next_run_at <= now
    cron = CronSchedule(schedule.cron, schedule.timezone)
    limit = min(now, schedule.end_at) if schedule.end_at is not None else now
    latest = cron.last_at_or_before(limit, not_before=old) if old <= limit else None
    runs: list[ScheduleRun] = []
    inc = 0
    if latest is not None:
        due = cron.ticks(old - timedelta(microseconds=1), latest)
        earlier = sum(1 for _ in islice(due, MISSED_COUNT_CAP))
        missed = earlier - 1  # ticks before the latest one, never fired
        fire: datetime | None = latest
        if schedule.misfire == "skip" and now - latest > grace:
            fire, missed = None, earlier
        if missed:
            last_missed: datetime | None = latest
            if fire is not None:
                last_missed = cron.last_at_or_before(latest - timedelta(microseconds=1), not_before=old)
            many = "at least " if earlier >= MISSED_COUNT_CAP else ""
            runs.append(
                ScheduleRun(
                    schedule_id=schedule.id,
                    tick_at=last_missed or old,
                    fired_at=now,
                    outcome="skipped_misfire",
                    message=f"{many}{missed} tick(s) missed from {old.isoformat()} "
                    f"to {(last_missed or old).isoformat()} (misfire policy {schedule.misfire})",
                )
            )
        if fire is not None:
            running = _overlapping(db, schedule.id) if schedule.overlap == "skip_if_running" else None
            if running is not None:
                runs.append(
                    ScheduleRun(
                        schedule_id=schedule.id,
                        tick_at=fire,
                        fired_at=now,
                        outcome="skipped_overlap",
                        message=f"study {running} of an earlier run is still queued or running",
                    )
                )
            else:
                inc = 1
                runs.append(
                    ScheduleRun(
                        schedule_id=schedule.id,
                        tick_at=fire,
                        fired_at=now,
                        study_name=tick_study_name(schedule.name, cron, fire),
                        outcome="pending",
                    )
                )
    new = _next_tick(schedule, cron, now, schedule.run_count + inc)
    try:
        with db.session() as session, session.begin():
            claimed = session.connection().execute(
                update(Schedule)
                .where(Schedule.id == schedule.id, Schedule.next_run_at == old, Schedule.enabled.is_(True))
                .values(next_run_at=new, run_count=Schedule.run_count + inc)
            )
            if claimed.rowcount != 1:
                return []  # another replica claimed this tick (or the schedule changed meanwhile)
            session.add_all(runs)
    except IntegrityError:  # the unique (schedule_id, tick_at) backstop
        _log.warning("schedule %s: tick %s was already recorded", schedule.name, old.isoformat())
        return []
    for run in runs:
        if run.outcome == "pending" and run.study_name is not None:
            _finish(db, run.id, schedule.id, schedule.template, run.study_name)
    return runs


def fire_due(db: Database, now: datetime, *, grace: timedelta = DEFAULT_GRACE) -> list[ScheduleRunRead]:
    """Fire every enabled schedule whose next tick is at or before ``now``.

    Safe to call from any number of replicas at once: each tick is claimed by exactly one.
    A schedule that missed ticks (no service ran) fires its latest tick if it is at most
    ``grace`` late; otherwise ``misfire: skip`` records the missed ticks as one
    ``skipped_misfire`` run and ``run_once`` fires the latest one late. Earlier missed ticks are
    recorded as one ``skipped_misfire`` run under both policies.

    Args:
        db: the database.
        now: the current time (injected: tests drive the clock).
        grace: how late a tick may fire and still count as on time.

    Returns:
        The runs this call recorded (none for ticks another replica claimed).
    """
    _recover_pending(db, now)
    with db.session() as session:
        due = list(
            session.scalars(
                select(Schedule)
                .where(Schedule.enabled.is_(True), Schedule.next_run_at <= now)
                .order_by(Schedule.next_run_at, Schedule.id)
            )
        )
    recorded: list[ScheduleRun] = []
    for schedule in due:
        try:
            recorded.extend(_fire_one(db, schedule, now, grace))
        except Exception:  # one broken schedule must not stop the others
            _log.exception("schedule %s: firing failed", schedule.name)
    if not recorded:
        return []
    with db.session() as session:
        fresh = list(session.scalars(select(ScheduleRun).where(ScheduleRun.id.in_([r.id for r in recorded]))))
        reads = _with_states(session, sorted(fresh, key=lambda r: (r.tick_at, r.id)))
    for run in reads:
        _log.info("schedule run %s tick %s: %s %s", run.schedule_id, run.tick_at, run.outcome, run.study_name)
    return reads


def scheduler_task(db: Database, settings: Settings) -> PeriodicTask:
    """The scheduler loop of one server process: :func:`fire_due` every ``scheduler_interval_s``."""
    grace = max(DEFAULT_GRACE, timedelta(seconds=3 * settings.scheduler_interval_s))
    interval = settings.scheduler_interval_s
    return PeriodicTask("scheduler", interval, lambda: fire_due(db, clock(), grace=grace))
