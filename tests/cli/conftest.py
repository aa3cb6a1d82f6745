"""One live caviar service per test module, and the ``caviar`` command line run against it.

The commands run in-process (typer's CliRunner) and reach the service over REST, as they do for
a user: ``CAVIAR_URL`` and ``CAVIAR_API_TOKEN`` (admin) point them at it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from click.testing import Result
from pydantic import SecretStr
from typer.testing import CliRunner

from caviar import storage
from caviar.cli import app
from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from tests.conftest import DatabaseFactory
from tests.service.helpers import external_study
from tests.service.test_dashboard import free_port, live_server

TOKEN = "cli-admin-token-0123456789abcdef"
runner = CliRunner()


@dataclass
class Service:
    """A live service on its own database, and helpers to run commands against it."""

    base: str
    db: Database
    settings: Settings

    @property
    def env(self) -> dict[str, str]:
        return {"CAVIAR_URL": self.base, "CAVIAR_API_TOKEN": TOKEN}

    def invoke(self, *args: str, code: int = 0, input: str | None = None) -> Result:
        """Run ``caviar <args>`` against the service; check its exit code."""
        result = runner.invoke(app, list(args), env=self.env, input=input)
        assert result.exit_code == code, (result.output, result.exception)
        return result

    def run(self, *args: str) -> str:
        """The output of a command that succeeds."""
        return self.invoke(*args).output

    def json(self, *args: str) -> Any:
        """The JSON a command prints with ``--json``."""
        return json.loads(self.invoke(*args, "--json").stdout)

    def http(self) -> httpx.Client:
        """An admin HTTP client of the service (to set the scene without the CLI)."""
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def finished_study(self, name: str, values: tuple[float, ...] = (0.3, 0.9, 0.6)) -> None:
        """Create an external study and tell one complete trial per value (it completes)."""
        with self.http() as http:
            created = http.post("/api/v1/studies", json=external_study(name, n_trials=len(values)))
            assert created.status_code == 201, created.text
            for value in values:
                number = http.post(f"/api/v1/studies/{name}/trials/ask", json={}).json()["number"]
                body = {"state": "complete", "value": value}
                told = http.post(f"/api/v1/studies/{name}/trials/{number}/tell", json=body)
                assert told.status_code == 200, told.text


@pytest.fixture(scope="module")
def service(databases: DatabaseFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service (admin token set, no background tasks) for the whole test module."""
    url = databases.migrated()
    settings = Settings(
        database_url=url,
        heartbeat_interval_s=30,
        artifact_dir=str(tmp_path_factory.mktemp("artifacts")),
        api_token=SecretStr(TOKEN),
        background_tasks=False,
    )
    db = Database(url)
    with live_server(create_app(settings, db=db), free_port()) as base:
        yield Service(base, db, settings)
    db.dispose()
    storage.reset_optuna_storages()
