"""``caviar schedule ...`` and ``caviar queue`` over REST against one live service."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from caviar.service.schedules import service as schedules
from tests.cli.conftest import Service
from tests.service.schedules.test_schedules import template


def write(tmp_path: Path, *documents: dict[str, Any]) -> str:
    path = tmp_path / "schedules.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    return str(path)


def spec(name: str = "nightly", **fields: Any) -> dict[str, Any]:
    return {"name": name, "cron": "30 2 * * *", "timezone": "Europe/Berlin", "template": template(), **fields}


def test_round_trip(service: Service, tmp_path: Path) -> None:
    path = write(tmp_path, spec(), spec("hourly", cron="0 * * * *", misfire="run_once"))
    created = service.json("schedule", "add", "-f", path)
    assert [s["name"] for s in created] == ["nightly", "hourly"]
    assert "created schedule third" in service.run("schedule", "add", "-f", write(tmp_path, spec("third")))

    assert {"nightly", "hourly", "third"} <= {s["name"] for s in service.json("schedule", "list")["items"]}
    table = service.run("schedule", "list")
    assert "nightly" in table and "Europe/Berlin" in table
    assert service.json("schedule", "show", "hourly")["misfire"] == "run_once"
    assert service.json("schedule", "show", str(created[0]["id"]))["name"] == "nightly"
    assert "search_space" in service.run("schedule", "show", "nightly")

    disabled = service.json("schedule", "disable", "nightly")
    assert disabled["enabled"] is False and disabled["next_run_at"] is None
    assert "disabled schedule nightly" in service.run("schedule", "disable", "nightly")
    # the hourly tick fires while nightly is off (its 02:30 tick may fall before it at any time of day)
    hourly_next = service.json("schedule", "show", "hourly")["next_run_at"]
    schedules.fire_due(service.db, datetime.fromisoformat(hourly_next) + timedelta(seconds=1))
    assert "enabled schedule nightly" in service.run("schedule", "enable", "nightly")

    run = service.json("schedule", "run", "nightly")
    assert run["manual"] is True and run["study_name"].startswith("nightly-manual-")
    assert "(manual run)" in service.run("schedule", "run", "third")
    runs = service.json("schedule", "runs", "nightly")
    assert [(r["outcome"], r["manual"], r["study_state"]) for r in runs["items"]] == [
        ("created", True, "queued")
    ]
    assert "created (manual)" in service.run("schedule", "runs", "nightly")
    assert service.json("schedule", "runs", "hourly")["items"][0]["outcome"] == "created"

    assert service.json("schedule", "delete", "third") == {"deleted": "third"}
    assert "deleted schedule hourly" in service.run("schedule", "delete", "hourly")
    names = [s["name"] for s in service.json("schedule", "list")["items"]]
    assert "nightly" in names and "hourly" not in names and "third" not in names


def test_queue_lists_queued_and_running_in_worker_order(service: Service, tmp_path: Path) -> None:
    for name, priority in [("q-low", 0), ("q-high", 50), ("q-later-high", 50), ("q-paused", 90)]:
        service.run("study", "create", "-f", write(tmp_path, {**template(priority=priority), "name": name}))
    service.run("study", "create", "-f", write(tmp_path, {**template(), "name": "q-low2"}))
    service.run("study", "pause", "q-paused")
    queue = [s["name"] for s in service.json("queue")["items"] if s["name"].startswith("q-")]
    assert queue == ["q-high", "q-later-high", "q-low", "q-low2"]
    assert "q-later-high" in service.run("queue")


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (spec("bad-cron", cron="* *"), "must have 5 fields"),
        (spec("bad-zone", timezone="Nowhere/Land"), "unknown timezone"),
        (spec("bad-budget", template=template(budget={"n_trials": -1})), "template.budget.n_trials"),
        (spec(name="x" * 101), "name"),
        ({"cron": "* * * * *"}, "name"),
    ],
)
def test_add_errors_are_one_line(
    service: Service, tmp_path: Path, document: dict[str, Any], fragment: str
) -> None:
    result = service.invoke("schedule", "add", "-f", write(tmp_path, document), code=1)
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_refusal_names_the_schedules_created_before_it(service: Service, tmp_path: Path) -> None:
    result = service.invoke(
        "schedule", "add", "-f", write(tmp_path, spec("fine"), spec("worse", cron="* *")), code=1
    )
    lines = result.stderr.strip().splitlines()
    assert lines == ["created schedule fine before the error", lines[1]] and "must have 5 fields" in lines[1]


def test_errors(service: Service, tmp_path: Path) -> None:
    for command in ("show", "run", "enable", "disable", "delete", "runs"):
        result = service.invoke("schedule", command, "nope", code=1)
        assert result.stderr.strip() == "error: no schedule 'nope'"
    service.run("schedule", "add", "-f", write(tmp_path, spec("twice")))
    assert (
        "already exists"
        in service.invoke("schedule", "add", "-f", write(tmp_path, spec("twice")), code=1).stderr
    )
    missing = service.invoke("schedule", "add", "-f", str(tmp_path / "missing.yaml"), code=1)
    assert "no such file" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    assert "not valid YAML" in service.invoke("schedule", "add", "-f", str(bad), code=1).stderr
