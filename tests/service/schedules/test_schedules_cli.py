"""``caviar schedule ...`` and ``caviar queue`` through typer's CliRunner (both backends)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from caviar.service.cli import app
from caviar.service.db import Database
from caviar.service.schedules import service
from caviar.storage import StudyRecord
from tests.service.schedules.test_schedules import template

runner = CliRunner()


def cli(db_url: str, *args: str, code: int = 0) -> Any:
    result = runner.invoke(app, [*args, "--database-url", db_url], env={"COLUMNS": "300"})
    assert result.exit_code == code, (result.output, result.exception)
    return result


def cli_json(db_url: str, *args: str) -> Any:
    return json.loads(cli(db_url, *args, "--json").stdout)


def write(tmp_path: Path, *documents: dict[str, Any]) -> str:
    path = tmp_path / "schedules.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    return str(path)


def spec(name: str = "nightly", **fields: Any) -> dict[str, Any]:
    return {"name": name, "cron": "30 2 * * *", "timezone": "Europe/Berlin", "template": template(), **fields}


def test_cli_round_trip(db_url: str, db: Database, tmp_path: Path) -> None:
    path = write(tmp_path, spec(), spec("hourly", cron="0 * * * *", misfire="run_once"))
    created = cli_json(db_url, "schedule", "add", "-f", path)
    assert [s["name"] for s in created] == ["nightly", "hourly"]
    assert (
        "created schedule third"
        in cli(db_url, "schedule", "add", "-f", write(tmp_path, spec("third"))).stdout
    )

    listed = cli_json(db_url, "schedule", "list")
    assert listed["total"] == 3
    table = cli(db_url, "schedule", "list").stdout
    assert "nightly" in table and "Europe/Berlin" in table
    assert cli_json(db_url, "schedule", "show", "hourly")["misfire"] == "run_once"
    assert cli_json(db_url, "schedule", "show", str(created[0]["id"]))["name"] == "nightly"
    assert "search_space" in cli(db_url, "schedule", "show", "nightly").stdout

    disabled = cli_json(db_url, "schedule", "disable", "nightly")
    assert disabled["enabled"] is False and disabled["next_run_at"] is None
    assert "enabled schedule nightly" in cli(db_url, "schedule", "enable", "nightly").stdout

    run = cli_json(db_url, "schedule", "run", "nightly")
    assert run["manual"] is True and run["study_name"].startswith("nightly-manual-")
    hourly_next = cli_json(db_url, "schedule", "show", "hourly")["next_run_at"]
    from datetime import datetime, timedelta

    service.fire_due(db, datetime.fromisoformat(hourly_next) + timedelta(seconds=1))
    runs = cli_json(db_url, "schedule", "runs", "nightly")
    assert [(r["outcome"], r["manual"], r["study_state"]) for r in runs["items"]] == [
        ("created", True, "queued")
    ]
    assert "created (manual)" in cli(db_url, "schedule", "runs", "nightly").stdout
    assert cli_json(db_url, "schedule", "runs", "hourly")["items"][0]["outcome"] == "created"

    assert cli_json(db_url, "schedule", "delete", "third") == {"deleted": "third"}
    assert "deleted schedule hourly" in cli(db_url, "schedule", "delete", "hourly").stdout
    assert [s["name"] for s in cli_json(db_url, "schedule", "list")["items"]] == ["nightly"]


def test_queue_lists_queued_and_running_in_worker_order(db_url: str, db: Database, tmp_path: Path) -> None:
    for name, priority in [("low", 0), ("high", 5), ("later-high", 5), ("paused", 9)]:
        doc = {**template(priority=priority), "name": name}
        cli(db_url, "study", "create", "-f", write(tmp_path, doc))
    cli(db_url, "study", "create", "-f", write(tmp_path, {**template(), "name": "low2"}))
    from caviar.service.studies.service import pause_study

    pause_study(db, "paused")
    queue = cli_json(db_url, "queue")
    assert [s["name"] for s in queue["items"]] == ["high", "later-high", "low", "low2"]
    assert "later-high" in cli(db_url, "queue").stdout


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (spec(cron="* *"), "must have 5 fields"),
        (spec(timezone="Nowhere/Land"), "unknown timezone"),
        (spec(template=template(budget={"n_trials": -1})), "template.budget.n_trials:"),
        (spec(name="x" * 101), "name:"),
        ({"cron": "* * * * *"}, "name: Field required"),
    ],
)
def test_cli_add_errors_are_one_line_and_create_nothing(
    db_url: str, db: Database, tmp_path: Path, document: dict[str, Any], fragment: str
) -> None:
    result = cli(db_url, "schedule", "add", "-f", write(tmp_path, spec("fine"), document), code=1)
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert service.list_schedules(db).total == 0  # the valid first document was not created either


def test_cli_errors(db_url: str, db: Database, tmp_path: Path) -> None:
    for command in ("show", "run", "enable", "disable", "delete", "runs"):
        result = cli(db_url, "schedule", command, "nope", code=1)
        assert result.stderr.strip() == "error: no schedule 'nope'"
    cli(db_url, "schedule", "add", "-f", write(tmp_path, spec()))
    assert "already exists" in cli(db_url, "schedule", "add", "-f", write(tmp_path, spec()), code=1).stderr
    assert (
        "no such file" in cli(db_url, "schedule", "add", "-f", str(tmp_path / "missing.yaml"), code=1).stderr
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    assert "not valid YAML" in cli(db_url, "schedule", "add", "-f", str(bad), code=1).stderr
    with db.session() as session:
        assert session.scalar(select(StudyRecord.id)) is None
