"""Schedules: firing with an injected clock (misfire, overlap, limits), REST round trips, errors.

Runs on SQLite and PostgreSQL. The helpers at the top are shared by the other
``test_schedules_*`` modules.
"""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.examples import example_path
from caviar.service.schedules import service
from caviar.service.schedules.schemas import ScheduleRead
from caviar.service.store import set_state
from caviar.service.studies.service import pause_study
from caviar.storage import Schedule, ScheduleRun, StudyRecord

_EXAMPLE: dict[str, Any] = yaml.safe_load(example_path("digits-mlp").read_text())


def template(**overrides: Any) -> dict[str, Any]:
    """The digits-mlp example without its name, as an external-objective template."""
    body = copy.deepcopy(_EXAMPLE)
    del body["name"]
    body["objective"] = {"kind": "external"}
    body.update(overrides)
    return body


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    """An aware UTC datetime."""
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def make(db: Database, now: datetime, name: str = "nightly", **fields: Any) -> ScheduleRead:
    """Create a schedule at ``now`` (every hour on the hour unless ``cron`` is given)."""
    spec = {"name": name, "cron": "0 * * * *", "template": template(), **fields}
    return service.create_schedule(db, service.parse_create(spec), now=now)


def study_names(db: Database) -> list[str]:
    with db.session() as session:
        return sorted(session.scalars(select(StudyRecord.name)))


def all_runs(db: Database) -> list[tuple[datetime, str | None, str]]:
    """(tick, study name, outcome) of every run, oldest tick first."""
    with db.session() as session:
        rows = session.scalars(select(ScheduleRun).order_by(ScheduleRun.tick_at, ScheduleRun.id))
        return [(r.tick_at, r.study_name, r.outcome) for r in rows]


# --- firing with an injected clock ---------------------------------------------------------


def test_fires_once_per_tick_with_an_injected_clock(db: Database) -> None:
    schedule = make(db, utc(2024, 5, 1, 9, 10), timezone="Europe/Berlin", template=template(priority=7))
    assert schedule.next_run_at == utc(2024, 5, 1, 10)
    assert service.fire_due(db, utc(2024, 5, 1, 9, 59, 59)) == []
    fired = service.fire_due(db, utc(2024, 5, 1, 10, 0, 2))
    assert [(r.outcome, r.study_name, r.study_state) for r in fired] == [
        ("created", "nightly-20240501T1200", "queued")
    ]
    assert service.fire_due(db, utc(2024, 5, 1, 10, 0, 3)) == []  # same tick: nothing more
    service.fire_due(db, utc(2024, 5, 1, 11, 0, 1))
    assert study_names(db) == ["nightly-20240501T1200", "nightly-20240501T1300"]
    with db.session() as session:
        record = session.scalar(select(StudyRecord).where(StudyRecord.name == "nightly-20240501T1300"))
        assert record is not None
        assert (record.priority, record.schedule_id, record.state) == (7, schedule.id, "queued")
        assert record.definition["search_space"].keys() == template()["search_space"].keys()
    shown = service.show_schedule(db, "nightly")
    assert (shown.run_count, shown.next_run_at) == (2, utc(2024, 5, 1, 12))


def test_berlin_0230_daily_fires_once_on_both_transition_days(db: Database) -> None:
    make(db, utc(2024, 3, 29), cron="30 2 * * *", timezone="Europe/Berlin", end_at="2024-04-02T00:00:00Z")
    make(db, utc(2024, 10, 25), name="autumn", cron="30 2 * * *", timezone="Europe/Berlin")
    now = utc(2024, 3, 29)
    while now < utc(2024, 4, 2):  # a scheduler polling every 30 minutes for four days
        service.fire_due(db, now)
        now += timedelta(minutes=30)
    now = utc(2024, 10, 25)
    while now < utc(2024, 10, 29):
        service.fire_due(db, now)
        now += timedelta(minutes=30)
    assert study_names(db) == [
        "autumn-20241025T0230",
        "autumn-20241026T0230",
        "autumn-20241027T0230",  # 02:30 CEST; the second 02:30 (CET) does not fire
        "autumn-20241028T0230",
        "nightly-20240329T0230",
        "nightly-20240330T0230",
        "nightly-20240331T0300",  # 02:30 does not exist that day: fired once, when the clocks change
        "nightly-20240401T0230",
    ]
    assert all(outcome == "created" for _, _, outcome in all_runs(db))


def test_every_20_minutes_keeps_its_beat_through_both_transitions(db: Database) -> None:
    """A wildcard schedule runs in real time (Vixie cron): the repeated hour fires again, with ``-2`` names."""
    make(db, utc(2026, 3, 29, 0, 30), name="spring", cron="*/20 * * * *", timezone="Europe/Berlin")
    make(db, utc(2026, 10, 25, 0, 30), name="fall", cron="*/20 * * * *", timezone="Europe/Berlin")
    for start in (utc(2026, 3, 29, 0, 30), utc(2026, 10, 25, 0, 30)):
        now = start
        while now <= start + timedelta(hours=2):  # a scheduler polling every 5 minutes
            service.fire_due(db, now)
            now += timedelta(minutes=5)
        service.update_schedule(
            db, "spring" if start.month == 3 else "fall", service.parse_update({"enabled": False})
        )
    runs = all_runs(db)
    assert all(outcome == "created" for _, _, outcome in runs)
    spring = [tick for tick, name, _ in runs if name and name.startswith("spring-")]
    fall = [tick for tick, name, _ in runs if name and name.startswith("fall-")]
    assert spring == [utc(2026, 3, 29, 0, 40) + k * timedelta(minutes=20) for k in range(6)]
    assert fall == [utc(2026, 10, 25, 0, 40) + k * timedelta(minutes=20) for k in range(6)]
    assert [name for _, name, _ in runs if name and name.startswith("fall-")] == [
        "fall-20261025T0240",
        "fall-20261025T0200-2",  # 02:00 CET, the second 02:00 of the night
        "fall-20261025T0220-2",
        "fall-20261025T0240-2",
        "fall-20261025T0300",
        "fall-20261025T0320",
    ]


def test_misfire_skip_records_missed_ticks_and_waits_for_the_next(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), misfire="skip")  # ticks 01:00, 02:00, 03:00 missed (no service)
    fired = service.fire_due(db, utc(2024, 5, 1, 3, 20))
    assert [(r.tick_at, r.outcome, r.study_name) for r in fired] == [
        (utc(2024, 5, 1, 3), "skipped_misfire", None)
    ]
    assert fired[0].message is not None and fired[0].message.startswith("3 tick(s) missed")
    assert study_names(db) == []
    assert service.show_schedule(db, "nightly").next_run_at == utc(2024, 5, 1, 4)
    service.fire_due(db, utc(2024, 5, 1, 4, 0, 30))  # on time again (within the grace period)
    assert study_names(db) == ["nightly-20240501T0400"]


def test_misfire_skip_fires_a_late_but_on_time_tick(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), misfire="skip")
    fired = service.fire_due(db, utc(2024, 5, 1, 2, 0, 40))  # 01:00 missed, 02:00 40 s late
    assert [(r.tick_at, r.outcome) for r in fired] == [
        (utc(2024, 5, 1, 1), "skipped_misfire"),
        (utc(2024, 5, 1, 2), "created"),
    ]
    assert fired[0].message is not None and fired[0].message.startswith("1 tick(s) missed")


def test_misfire_run_once_fires_the_latest_missed_tick_once(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), misfire="run_once")
    fired = service.fire_due(db, utc(2024, 5, 1, 3, 20))
    assert [(r.tick_at, r.outcome, r.study_name) for r in fired] == [
        (utc(2024, 5, 1, 2), "skipped_misfire", None),
        (utc(2024, 5, 1, 3), "created", "nightly-20240501T0300"),
    ]
    assert fired[0].message is not None and fired[0].message.startswith("2 tick(s) missed")
    assert service.fire_due(db, utc(2024, 5, 1, 3, 25)) == []
    assert study_names(db) == ["nightly-20240501T0300"]
    assert service.show_schedule(db, "nightly").run_count == 1


def test_overlap_skip_if_running(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), overlap="skip_if_running")
    service.fire_due(db, utc(2024, 5, 1, 1, 0, 1))
    fired = service.fire_due(db, utc(2024, 5, 1, 2, 0, 1))  # the 01:00 study is still queued
    assert [(r.outcome, r.study_name) for r in fired] == [("skipped_overlap", None)]
    assert fired[0].message == "study nightly-20240501T0100 of an earlier run is still queued or running"
    with db.session() as session, session.begin():
        record = session.scalar(select(StudyRecord).where(StudyRecord.name == "nightly-20240501T0100"))
        assert record is not None
        set_state(session, record, "running")
    assert service.fire_due(db, utc(2024, 5, 1, 3, 0, 1))[0].outcome == "skipped_overlap"
    with db.session() as session, session.begin():
        record = session.scalar(select(StudyRecord).where(StudyRecord.name == "nightly-20240501T0100"))
        assert record is not None
        set_state(session, record, "completed")
    assert service.fire_due(db, utc(2024, 5, 1, 4, 0, 1))[0].outcome == "created"
    pause_study(db, "nightly-20240501T0400")  # paused is neither queued nor running
    assert service.fire_due(db, utc(2024, 5, 1, 5, 0, 1))[0].outcome == "created"
    assert service.show_schedule(db, "nightly").run_count == 3


def test_overlap_allow_fires_while_running(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30))
    service.fire_due(db, utc(2024, 5, 1, 1, 0, 1))
    service.fire_due(db, utc(2024, 5, 1, 2, 0, 1))
    assert study_names(db) == ["nightly-20240501T0100", "nightly-20240501T0200"]


def test_max_runs_and_end_at_finish_a_schedule(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), max_runs=2)
    make(db, utc(2024, 5, 1, 0, 30), name="ending", end_at="2024-05-01T02:30:00Z")
    for hour in range(1, 6):
        service.fire_due(db, utc(2024, 5, 1, hour, 0, 1))
    assert study_names(db) == [
        "ending-20240501T0100",
        "ending-20240501T0200",
        "nightly-20240501T0100",
        "nightly-20240501T0200",
    ]
    assert service.show_schedule(db, "nightly").next_run_at is None
    assert service.show_schedule(db, "ending").next_run_at is None
    # raising max_runs brings the schedule back
    raised = service.update_schedule(
        db, "nightly", service.parse_update({"max_runs": 3}), now=utc(2024, 5, 1, 6)
    )
    assert raised.next_run_at == utc(2024, 5, 1, 7)


def test_run_once_end_at_in_the_past_fires_its_last_tick(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), misfire="run_once", end_at="2024-05-01T02:30:00+00:00")
    fired = service.fire_due(db, utc(2024, 5, 2))
    assert [(r.tick_at, r.outcome) for r in fired] == [
        (utc(2024, 5, 1, 1), "skipped_misfire"),
        (utc(2024, 5, 1, 2), "created"),
    ]
    assert service.show_schedule(db, "nightly").next_run_at is None


def test_disabled_schedule_does_not_fire_and_reenabling_starts_from_now(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), enabled=False)
    assert service.show_schedule(db, "nightly").next_run_at is None
    assert service.fire_due(db, utc(2024, 5, 1, 5)) == []
    enabled = service.update_schedule(
        db, "nightly", service.parse_update({"enabled": True}), now=utc(2024, 5, 1, 5, 1)
    )
    assert enabled.next_run_at == utc(2024, 5, 1, 6)
    assert [r.outcome for r in service.fire_due(db, utc(2024, 5, 1, 6, 0, 1))] == ["created"]


def test_a_study_name_taken_by_someone_else_records_an_error(db: Database) -> None:
    from caviar.service.definition import StudyDefinition
    from caviar.service.store import create_study

    make(db, utc(2024, 5, 1, 0, 30))
    create_study(db, StudyDefinition.from_template("nightly-20240501T0100", template()))
    fired = service.fire_due(db, utc(2024, 5, 1, 1, 0, 1))
    assert [(r.outcome, r.study_name) for r in fired] == [("error", "nightly-20240501T0100")]
    assert fired[0].message == "a study named 'nightly-20240501T0100' already exists"
    assert service.show_schedule(db, "nightly").next_run_at == utc(2024, 5, 1, 2)  # moves on
    assert service.fire_due(db, utc(2024, 5, 1, 2, 0, 1))[0].outcome == "created"


def test_a_run_left_pending_by_a_crash_is_finished(db: Database) -> None:
    schedule = make(db, utc(2024, 5, 1, 0, 30))
    _leave_pending(db, schedule.id)
    service.fire_due(db, utc(2024, 5, 1, 1, 2))
    assert all_runs(db)[0][2] == "pending"  # not yet: the claiming replica may still be working
    service.fire_due(db, utc(2024, 5, 1, 1, 10))
    assert all_runs(db) == [(utc(2024, 5, 1, 1), "nightly-20240501T0100", "created")]
    assert study_names(db) == ["nightly-20240501T0100"]


def test_manual_run(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), enabled=False, timezone="Asia/Tokyo")
    run = service.run_now(db, "nightly", now=utc(2024, 5, 1, 0, 40, 5))
    assert (run.manual, run.outcome, run.study_name) == (True, "created", "nightly-manual-20240501T094005")
    page = service.list_runs(db, "1")
    assert page.total == 1 and page.items[0].study_state == "queued"
    with pytest.raises(service.Conflict):  # the same second again
        service.run_now(db, "nightly", now=utc(2024, 5, 1, 0, 40, 5))
    assert service.list_runs(db, "nightly").total == 1  # nothing half-recorded


# --- the scheduler loop inside the app -----------------------------------------------------


def test_the_app_lifespan_runs_the_scheduler(
    settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_now = [utc(2024, 5, 1, 0, 30)]
    monkeypatch.setattr(service, "clock", lambda: fake_now[0])
    make(db, fake_now[0])
    app = create_app(settings.model_copy(update={"scheduler_interval_s": 0.05}), db=db)
    with TestClient(app) as client:
        fake_now[0] = utc(2024, 5, 1, 1, 0, 1)
        deadline = time.monotonic() + 20
        while not study_names(db) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert study_names(db) == ["nightly-20240501T0100"]
        runs = client.get("/api/v1/schedules/nightly/runs").json()
        assert [(r["outcome"], r["study_state"]) for r in runs["items"]] == [("created", "queued")]


# --- REST ----------------------------------------------------------------------------------


@pytest.fixture
def api(settings: Settings, db: Database) -> Any:
    """A client whose app runs no background tasks (tests drive fire_due themselves)."""
    with TestClient(create_app(settings.model_copy(update={"background_tasks": False}), db=db)) as client:
        yield client


def body(name: str = "nightly", **fields: Any) -> dict[str, Any]:
    return {"name": name, "cron": "30 2 * * *", "timezone": "Europe/Berlin", "template": template(), **fields}


def test_rest_round_trip(api: TestClient, db: Database) -> None:
    created = api.post("/api/v1/schedules", json=body(overlap="skip_if_running", max_runs=5))
    assert created.status_code == 201, created.text
    schedule = created.json()
    assert schedule["cron"] == "30 2 * * *" and schedule["enabled"] is True and schedule["run_count"] == 0
    assert schedule["next_run_at"] is not None and schedule["template"]["priority"] == 0
    assert api.get(f"/api/v1/schedules/{schedule['id']}").json() == schedule
    assert api.get("/api/v1/schedules/nightly").json() == schedule
    listed = api.get("/api/v1/schedules").json()
    assert listed["total"] == 1 and listed["items"] == [schedule]

    disabled = api.patch("/api/v1/schedules/nightly", json={"enabled": False}).json()
    assert disabled["enabled"] is False and disabled["next_run_at"] is None
    changed = api.patch(
        "/api/v1/schedules/nightly", json={"enabled": True, "cron": "0 6 * * 1", "timezone": "UTC"}
    ).json()
    assert changed["cron"] == "0 6 * * 1" and changed["timezone"] == "UTC"
    next_run = datetime.fromisoformat(changed["next_run_at"])
    assert (next_run.weekday(), next_run.hour, next_run.minute) == (0, 6, 0)
    new_template = template(priority=5)
    assert (
        api.patch("/api/v1/schedules/nightly", json={"template": new_template}).json()["template"]
        == new_template
    )
    cleared = api.patch(
        "/api/v1/schedules/nightly", json={"max_runs": None, "misfire": "run_once", "overlap": "allow"}
    ).json()
    assert cleared["max_runs"] is None and cleared["misfire"] == "run_once"

    manual = api.post("/api/v1/schedules/nightly/run")
    assert manual.status_code == 201 and manual.json()["manual"] is True
    study = api.get(f"/api/v1/studies/{manual.json()['study_name']}").json()
    assert study["state"] == "queued" and study["priority"] == 5

    # the scheduler fires the next tick; runs list both with their studies' live state
    service.fire_due(db, next_run + timedelta(seconds=1))
    runs = api.get("/api/v1/schedules/nightly/runs").json()
    assert runs["total"] == 2
    assert [(r["outcome"], r["manual"], r["study_state"]) for r in runs["items"]] == [
        ("created", False, "queued"),
        ("created", True, "queued"),
    ]
    assert runs["items"][0]["study_name"] == f"nightly-{next_run:%Y%m%dT%H%M}"
    assert api.get("/api/v1/schedules/nightly/runs", params={"limit": 1}).json()["items"] == runs["items"][:1]
    api.delete(f"/api/v1/studies/{runs['items'][1]['study_name']}")
    assert api.get("/api/v1/schedules/nightly/runs").json()["items"][1]["study_state"] is None

    queue = api.get("/api/v1/studies", params={"order": "queue"}).json()
    assert [s["name"] for s in queue["items"]] == [runs["items"][0]["study_name"]]

    assert api.delete("/api/v1/schedules/nightly").status_code == 204
    assert api.get("/api/v1/schedules/nightly").status_code == 404
    assert api.get("/api/v1/studies").json()["total"] == 1  # its studies stay
    with db.session() as session:
        assert session.scalar(select(ScheduleRun.id)) is None


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return dict(error)


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"cron": "* * *"}, "cron", "must have 5 fields"),
        ({"cron": "70 * * * *"}, "cron", "invalid cron expression"),
        ({"cron": "0 0 31 2 *"}, "cron", "never fires"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone", "unknown timezone"),
        ({"name": "-bad"}, "name", "pattern"),
        ({"name": "n" * 101}, "name", "at most 100"),
        ({"misfire": "later"}, "misfire", "skip"),
        ({"overlap": "sometimes"}, "overlap", "allow"),
        ({"max_runs": 0}, "max_runs", "greater than or equal to 1"),
        ({"end_at": "2024-05-01T00:00:00"}, "end_at", "timezone"),
        ({"bogus": 1}, "bogus", "Extra inputs"),
    ],
)
def test_invalid_schedules_are_422(
    api: TestClient, fields: dict[str, Any], field: str, fragment: str
) -> None:
    error = _error(api.post("/api/v1/schedules", json=body(**fields)), 422, "validation_error")
    assert error["details"][0]["field"] == field
    assert fragment in error["details"][0]["message"]
    assert api.get("/api/v1/schedules").json()["total"] == 0


@pytest.mark.parametrize(
    ("tmpl", "field"),
    [
        (
            template(search_space={"lr": {"type": "float", "low": "x", "high": 0.1}}),
            "template.search_space.lr.low",
        ),
        ({**template(), "name": "sneaky"}, "template.name"),
        ({**template(), "budget": {"n_trials": 0}}, "template.budget.n_trials"),
        # the built-in trainer needs a search space (external, python and command studies may have none)
        (
            {k: v for k, v in template(objective=_EXAMPLE["objective"]).items() if k != "search_space"},
            "template.search_space",
        ),
    ],
)
def test_invalid_template_is_422_with_its_field_path(
    api: TestClient, tmpl: dict[str, Any], field: str
) -> None:
    error = _error(api.post("/api/v1/schedules", json=body(template=tmpl)), 422, "validation_error")
    assert error["details"][0]["field"] == field
    assert error["message"].startswith(field)
    assert api.get("/api/v1/schedules").json()["total"] == 0


def test_longest_name_fits_the_study_name(api: TestClient, db: Database) -> None:
    name = "n" * 100
    created = api.post("/api/v1/schedules", json=body(name=name, cron="* * * * *", timezone="UTC"))
    assert created.status_code == 201
    assert len(api.post(f"/api/v1/schedules/{name}/run").json()["study_name"]) <= 128
    service.fire_due(db, datetime.fromisoformat(created.json()["next_run_at"]))
    assert [len(n) for n in study_names(db)] == [114, 123]


def test_name_collision_is_409(api: TestClient) -> None:
    assert api.post("/api/v1/schedules", json=body()).status_code == 201
    _error(api.post("/api/v1/schedules", json=body(cron="0 * * * *")), 409, "name_taken")
    assert api.get("/api/v1/schedules").json()["total"] == 1


def test_unknown_schedule_is_404(api: TestClient) -> None:
    for method, path in [
        ("GET", "/api/v1/schedules/nope"),
        ("GET", "/api/v1/schedules/42"),
        ("PATCH", "/api/v1/schedules/nope"),
        ("DELETE", "/api/v1/schedules/nope"),
        ("POST", "/api/v1/schedules/nope/run"),
        ("GET", "/api/v1/schedules/nope/runs"),
    ]:
        kwargs = {"json": {"enabled": False}} if method == "PATCH" else {}
        _error(api.request(method, path, **kwargs), 404, "schedule_not_found")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cron": "nope"}, "cron"),
        ({"timezone": "Nowhere/Land"}, "timezone"),
        (
            {"template": {"search_space": {"lr": {"type": "float", "low": 1, "high": 0}}}},
            "template.search_space.lr",
        ),
        ({"enabled": None}, "enabled"),
        ({"cron": None}, "cron"),
        ({"name": "renamed"}, "name"),
        ({"max_runs": -1}, "max_runs"),
    ],
)
def test_invalid_changes_are_422_and_change_nothing(
    api: TestClient, change: dict[str, Any], field: str
) -> None:
    before = api.post("/api/v1/schedules", json=body()).json()
    error = _error(api.patch("/api/v1/schedules/nightly", json=change), 422, "validation_error")
    assert error["details"][0]["field"].startswith(field)
    assert api.get("/api/v1/schedules/nightly").json() == before


def test_malformed_json_is_the_error_envelope(api: TestClient) -> None:
    response = api.post("/api/v1/schedules", content=b"{nope", headers={"content-type": "application/json"})
    _error(response, 422, "validation_error")


# --- found by mutation testing (docs/mutation-testing.md) ----------------------------------


def _leave_pending(db: Database, schedule_id: int) -> None:
    """What a replica that died after its claim leaves: a pending run of the 01:00 tick."""
    with db.session() as session, session.begin():
        session.execute(update(Schedule).values(next_run_at=utc(2024, 5, 1, 2), run_count=1))
        session.add(
            ScheduleRun(
                schedule_id=schedule_id,
                tick_at=utc(2024, 5, 1, 1),
                fired_at=utc(2024, 5, 1, 1),
                study_name="nightly-20240501T0100",
                outcome="pending",
            )
        )


def test_a_pending_run_whose_study_was_created_before_the_crash_is_created(db: Database) -> None:
    from caviar.service.definition import StudyDefinition
    from caviar.service.store import create_study

    schedule = make(db, utc(2024, 5, 1, 0, 30))
    make(db, utc(2024, 5, 1, 0, 30), name="other", enabled=False)
    _leave_pending(db, schedule.id)
    definition = StudyDefinition.from_template("nightly-20240501T0100", template())
    create_study(db, definition, schedule_id=schedule.id)  # the crash came after this
    service.fire_due(db, utc(2024, 5, 1, 1, 10))
    assert all_runs(db) == [(utc(2024, 5, 1, 1), "nightly-20240501T0100", "created")]


def test_a_template_invalid_at_fire_time_records_an_error(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30))
    broken = template()
    broken["search_space"] = {"lr": {"type": "float", "low": 1.0, "high": 0.1}}
    with db.session() as session, session.begin():  # e.g. a template stored by an older version
        session.execute(update(Schedule).values(template=broken))
    (run,) = service.fire_due(db, utc(2024, 5, 1, 1, 0, 1))
    assert run.outcome == "error" and run.message is not None
    assert run.message.startswith("template.search_space.lr")
    assert study_names(db) == []


def test_an_unexpected_error_while_creating_the_study_is_recorded(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(service, "create_study", boom)
    make(db, utc(2024, 5, 1, 0, 30))
    (run,) = service.fire_due(db, utc(2024, 5, 1, 1, 0, 1))
    assert (run.outcome, run.message) == (
        "error",
        "could not create the study (RuntimeError; see the server log)",
    )


# --- found by mutation testing (docs/mutation-testing.md) ----------------------------------


def _fired_at(db: Database) -> list[tuple[str, datetime]]:
    with db.session() as session:
        rows = session.scalars(select(ScheduleRun).order_by(ScheduleRun.tick_at, ScheduleRun.id))
        return [(r.outcome, r.fired_at.replace(tzinfo=UTC)) for r in rows]


def test_missed_ticks_are_named_from_first_to_last_and_every_run_records_when_it_fired(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), misfire="run_once", overlap="skip_if_running")
    now = utc(2024, 5, 1, 3, 20)
    (missed, created) = service.fire_due(db, now)
    assert missed.message == (
        "2 tick(s) missed from 2024-05-01T01:00:00+00:00 to 2024-05-01T02:00:00+00:00 (misfire policy run_once)"
    )
    assert created.outcome == "created"
    later = utc(2024, 5, 1, 4, 0, 7)
    assert [r.outcome for r in service.fire_due(db, later)] == ["skipped_overlap"]
    assert _fired_at(db) == [("skipped_misfire", now), ("created", now), ("skipped_overlap", later)]


def test_misfire_skip_fires_a_tick_exactly_the_grace_period_late(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), misfire="skip")
    (run,) = service.fire_due(db, utc(2024, 5, 1, 1) + service.DEFAULT_GRACE)
    assert (run.outcome, run.study_name) == ("created", "nightly-20240501T0100")


def test_missed_ticks_beyond_the_count_cap_say_at_least(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "MISSED_COUNT_CAP", 5)  # ticks are counted one by one: cap the walk
    make(db, utc(2024, 5, 1, 0, 30), misfire="skip")
    (run,) = service.fire_due(db, utc(2024, 5, 1, 8, 30))  # 8 ticks missed
    assert run.outcome == "skipped_misfire" and run.message is not None
    assert run.message.startswith("at least 5 tick(s) missed from 2024-05-01T01:00:00+00:00 to ")
    make(db, utc(2024, 5, 1, 0, 30), name="few", misfire="skip")
    (run,) = service.fire_due(db, utc(2024, 5, 1, 4, 30))  # 4 missed: below the cap, counted exactly
    assert run.message is not None and run.message.startswith("4 tick(s) missed")


def test_only_the_schedules_own_studies_count_as_overlapping(db: Database) -> None:
    from caviar.service.definition import StudyDefinition
    from caviar.service.store import create_study

    make(db, utc(2024, 5, 1, 0, 30), overlap="skip_if_running")
    create_study(db, StudyDefinition.from_template("someone-elses", template()))  # queued, no schedule
    make(db, utc(2024, 5, 1, 0, 30), name="neighbour")  # its queued studies are not ours either
    service.fire_due(db, utc(2024, 5, 1, 1, 0, 1))
    assert [o for _, _, o in all_runs(db)] == ["created", "created"]


def test_an_overlap_names_the_newest_running_study(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30))
    service.fire_due(db, utc(2024, 5, 1, 1, 0, 1))
    service.fire_due(db, utc(2024, 5, 1, 2, 0, 1))
    service.update_schedule(db, "nightly", service.parse_update({"overlap": "skip_if_running"}))
    (run,) = service.fire_due(db, utc(2024, 5, 1, 3, 0, 1))
    assert run.message == "study nightly-20240501T0200 of an earlier run is still queued or running"


def test_a_manual_run_is_linked_to_its_schedule_and_recorded_when_it_ran(db: Database) -> None:
    schedule = make(db, utc(2024, 5, 1, 0, 30))
    now = utc(2024, 5, 1, 0, 40, 5)
    run = service.run_now(db, "nightly", now=now)
    assert (run.fired_at, run.study_state) == (now, "queued")
    assert _fired_at(db) == [("created", now)]
    with db.session() as session:
        study = session.scalar(select(StudyRecord).where(StudyRecord.name == run.study_name))
        assert study is not None and study.schedule_id == schedule.id


def test_a_manual_run_of_a_template_invalid_now_names_the_template_field(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30))
    broken = template()
    broken["search_space"] = {"lr": {"type": "float", "low": 1.0, "high": 0.1}}
    with db.session() as session, session.begin():
        session.execute(update(Schedule).values(template=broken))
    with pytest.raises(service.InvalidInput) as raised:
        service.run_now(db, "nightly", now=utc(2024, 5, 1, 0, 40, 5))
    assert raised.value.details and raised.value.details[0]["field"].startswith("template.search_space.lr")
    assert study_names(db) == [] and service.list_runs(db, "nightly").total == 0


def test_finishing_a_run_touches_that_run_alone_and_only_while_pending(db: Database) -> None:
    from caviar.service.definition import StudyDefinition
    from caviar.service.store import create_study

    first = make(db, utc(2024, 5, 1, 0, 30))
    second = make(db, utc(2024, 5, 1, 0, 30), name="other")
    _leave_pending(db, first.id)
    with db.session() as session, session.begin():
        session.add(
            ScheduleRun(
                schedule_id=second.id,
                tick_at=utc(2024, 5, 1, 1),
                fired_at=utc(2024, 5, 1, 1),
                study_name="other-20240501T0100",
                outcome="pending",
            )
        )
    with db.session() as session:
        ids = {r.study_name: r.id for r in session.scalars(select(ScheduleRun))}
    service._finish(db, ids["nightly-20240501T0100"], first.id, template(), "nightly-20240501T0100")
    assert [(n, o) for _, n, o in all_runs(db)] == [
        ("nightly-20240501T0100", "created"),
        ("other-20240501T0100", "pending"),
    ]
    # a second finisher (a replica recovering the run it saw pending) must not rewrite the outcome
    create_study(db, StudyDefinition.from_template("taken", template()))
    service._finish(db, ids["nightly-20240501T0100"], first.id, template(), "taken")
    assert all_runs(db)[0][2] == "created"


def _stale(db: Database, name: str) -> Schedule:
    """The schedule as a replica read it before someone changed it."""
    with db.session() as session:
        schedule = session.scalar(select(Schedule).where(Schedule.name == name))
        assert schedule is not None
        session.expunge(schedule)
        return schedule


def test_a_tick_is_not_fired_from_a_stale_read_of_a_schedule_changed_meanwhile(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30))
    make(db, utc(2024, 5, 1, 0, 30), name="moved")
    disabled, moved = _stale(db, "nightly"), _stale(db, "moved")
    service.update_schedule(
        db, "nightly", service.parse_update({"enabled": False}), now=utc(2024, 5, 1, 0, 50)
    )
    service.update_schedule(
        db, "moved", service.parse_update({"cron": "30 * * * *"}), now=utc(2024, 5, 1, 0, 50)
    )
    now = utc(2024, 5, 1, 1, 0, 1)
    assert service._fire_one(db, disabled, now, service.DEFAULT_GRACE) == []
    assert service._fire_one(db, moved, now, service.DEFAULT_GRACE) == []
    assert all_runs(db) == [] and study_names(db) == []
    assert service.show_schedule(db, "moved").next_run_at == utc(2024, 5, 1, 1, 30)


def test_a_tick_exactly_at_end_at_still_fires(db: Database) -> None:
    make(db, utc(2024, 5, 1, 0, 30), end_at="2024-05-01T02:00:00Z")
    service.fire_due(db, utc(2024, 5, 1, 1, 0, 1))
    assert service.show_schedule(db, "nightly").next_run_at == utc(2024, 5, 1, 2)
    service.fire_due(db, utc(2024, 5, 1, 2, 0, 1))
    assert study_names(db) == ["nightly-20240501T0100", "nightly-20240501T0200"]
    assert service.show_schedule(db, "nightly").next_run_at is None


def test_a_pending_run_is_recovered_only_after_the_full_timeout(db: Database) -> None:
    schedule = make(db, utc(2024, 5, 1, 0, 30))
    _leave_pending(db, schedule.id)  # fired at 01:00
    service.fire_due(db, utc(2024, 5, 1, 1) + service.PENDING_TIMEOUT)
    assert all_runs(db)[0][2] == "pending"
    service.fire_due(db, utc(2024, 5, 1, 1) + service.PENDING_TIMEOUT + timedelta(seconds=1))
    assert all_runs(db)[0][2] == "created"


def test_recovery_leaves_finished_runs_alone(db: Database) -> None:
    from caviar.service.studies.service import delete_study

    make(db, utc(2024, 5, 1, 0, 30))
    service.fire_due(db, utc(2024, 5, 1, 1, 0, 1))
    delete_study(db, "nightly-20240501T0100")  # its owner deleted the study of a finished run
    service.fire_due(db, utc(2024, 5, 1, 1, 30))  # long after the pending timeout of that run
    assert study_names(db) == [] and all_runs(db)[0][2] == "created"
