"""docker-compose.yml and the Dockerfile against the CLI and the settings they rely on.

No Docker engine runs here: these tests parse the files and check every ``caviar`` command,
flag and ``CAVIAR_*`` variable they use against the real typer app and ``Settings``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from caviar.cli import app as cli_app
from caviar.service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
CAVIAR_SERVICES = [name for name, spec in SERVICES.items() if "build" in spec]
ROOT_COMMAND = typer.main.get_command(cli_app)


def parse_cli(args: list[str]) -> Any:
    """Resolve ``caviar <args>`` to its command and parse every option as click would.

    Raises:
        AssertionError: no such command.
        UsageError: an unknown flag or a bad value (typer's vendored click).
    """
    command: Any = ROOT_COMMAND
    rest = list(args)
    while hasattr(command, "commands"):
        assert rest, f"`caviar {' '.join(args)}` names no command"
        name = rest.pop(0)
        assert name in command.commands, f"`caviar {' '.join(args)}`: no command {name!r}"
        command = command.commands[name]
    return command.make_context(command.name or "caviar", rest)


def dockerfile_json(instruction: str) -> list[str]:
    match = re.search(rf"^{instruction}\s+(\[.*\])\s*$", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, f"Dockerfile has no exec-form {instruction}"
    return list(json.loads(match.group(1)))


def test_caviar_services_use_the_image_whose_entrypoint_is_caviar() -> None:
    assert dockerfile_json("ENTRYPOINT") == ["caviar"]
    parse_cli(dockerfile_json("CMD"))
    assert {"migrate", "api", "worker", "cpu-worker", "dashboard"} <= set(CAVIAR_SERVICES)
    for name in CAVIAR_SERVICES:
        assert SERVICES[name]["build"]["context"] == "."


@pytest.mark.parametrize("service", CAVIAR_SERVICES)
def test_every_command_and_flag_exists_in_the_cli(service: str) -> None:
    command = SERVICES[service]["command"]
    assert isinstance(command, list), "use the exec form: a list of arguments"
    parse_cli(command)


def test_the_roles_run_the_right_commands() -> None:
    assert SERVICES["migrate"]["command"] == ["db", "upgrade"]
    api = SERVICES["api"]["command"]
    assert api[0] == "serve" and "--no-migrate" in api and api[api.index("--host") + 1] == "0.0.0.0"
    assert SERVICES["worker"]["command"] == ["worker", "--gpus", "all"]
    assert SERVICES["cpu-worker"]["command"] == ["worker", "--gpus", "none", "--cpu", "2"]
    assert SERVICES["cpu-worker"]["profiles"] == ["cpu"]
    assert SERVICES["dashboard"]["command"][0] == "dashboard"


SERVER_SIDE = ("migrate", "api", "dashboard")
WORKERS = ("worker", "cpu-worker")
CLIENT_VARIABLES = {"CAVIAR_URL", "CAVIAR_API_TOKEN"}
"""What ``caviar worker`` reads besides Settings (the client's URL and token)."""


def test_environment_names_are_settings_fields() -> None:
    fields = {f"CAVIAR_{name.upper()}" for name in Settings.model_fields}
    seen: set[str] = set()
    for name in CAVIAR_SERVICES:
        environment = SERVICES[name].get("environment", {})
        assert isinstance(environment, dict)
        for key in environment:
            if key.startswith("CAVIAR_"):
                assert key in fields | CLIENT_VARIABLES, f"{name}: {key} is not a Settings field"
                seen.add(key)
    assert {
        "CAVIAR_DATABASE_URL",
        "CAVIAR_API_TOKEN",
        "CAVIAR_WORKER_TOKEN",
        "CAVIAR_HEARTBEAT_INTERVAL_S",
    } <= seen


def test_the_api_needs_both_tokens_from_the_environment() -> None:
    for name in ("api", "dashboard"):
        token = SERVICES[name]["environment"]["CAVIAR_API_TOKEN"]
        assert token.startswith("${CAVIAR_API_TOKEN:?"), "a required variable: no token, no start"
    assert SERVICES["api"]["environment"]["CAVIAR_WORKER_TOKEN"].startswith("${CAVIAR_WORKER_TOKEN:?")


def test_workers_get_a_url_and_the_worker_token_and_no_database_credentials() -> None:
    for name in WORKERS:
        environment = SERVICES[name]["environment"]
        assert set(environment) == CLIENT_VARIABLES, environment
        assert environment["CAVIAR_API_TOKEN"].startswith("${CAVIAR_WORKER_TOKEN:?")
        assert "api:8000" in environment["CAVIAR_URL"]
        text = json.dumps(SERVICES[name])
        assert "postgres" not in text and "DATABASE" not in text and "POSTGRES" not in text


def test_postgres_is_private_with_a_healthcheck_and_a_volume() -> None:
    postgres = SERVICES["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in COMPOSE["volumes"]
    assert "ports" not in postgres, "PostgreSQL is never published: workers reach the API, not the database"
    assert "/healthz" in " ".join(SERVICES["api"]["healthcheck"]["test"])
    for name in SERVER_SIDE:
        assert "postgres:5432" in SERVICES[name]["environment"]["CAVIAR_DATABASE_URL"]


def test_migration_runs_once_before_servers_and_workers() -> None:
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["restart"] == "no"
    for name in ("api", "dashboard"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in WORKERS:
        assert SERVICES[name]["depends_on"]["api"]["condition"] == "service_healthy"


def test_worker_reserves_gpus_and_can_scale() -> None:
    worker = SERVICES["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == "all" or int(device["count"]) >= 1
    for name in ("worker", "cpu-worker"):
        assert "container_name" not in SERVICES[name] and "ports" not in SERVICES[name], (
            "--scale needs these unset"
        )
        assert SERVICES[name]["stop_grace_period"]


def test_dockerignore_keeps_the_package_in_the_build_context() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests"} <= ignored
    assert not {"caviar", "pyproject.toml"} & ignored
    copied = re.findall(r"^COPY\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    # the whole package is one folder; the top-level service/ storage/ trainer/ are signposts
    assert "caviar" in copied
    assert not {"storage", "service", "trainer"} & set(copied)


@pytest.mark.parametrize("args", [["serve", "--hots", "x"], ["worker", "--gpu", "all"], ["nope"], ["db"]])
def test_the_checker_refuses_unknown_commands_and_flags(args: list[str]) -> None:
    with pytest.raises(Exception) as refused:
        parse_cli(args)
    assert isinstance(refused.value, AssertionError) or type(refused.value).__name__ == "NoSuchOption"
