"""``file:`` datasets: paths stay under the data root, and over REST only when the service has one.

Regression tests of the hardening finding "a write token can read any file a worker can read"
(``file:/proc/self/environ``, ``file:../../...``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.errors import InvalidInput
from caviar.service.examples import example_path
from caviar.service.store import create_study, parse_definition

EXAMPLE: dict[str, Any] = yaml.safe_load(example_path("digits-mlp").read_text())


def trainer_study(name: str, dataset: str) -> dict[str, Any]:
    body = copy.deepcopy(EXAMPLE)
    body["name"] = name
    body["objective"]["dataset"] = dataset
    return body


@pytest.mark.parametrize(
    "dataset",
    [
        "file:/proc/self/environ",
        "file:/etc/passwd.csv",
        "file:../../etc/passwd.csv",
        "file:data/../../secret.csv",
        "file:..",
        "file:",
        "file:~/data.csv",
        "file:C:/data.csv",
        "file:data\\..\\x.csv",
        "file:data/x.txt",
        "file:data/x.csv\n",
    ],
)
def test_paths_that_could_leave_the_data_root_are_refused(dataset: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_definition(trainer_study("s", dataset))
    assert refused.value.message.startswith("objective: ") or "dataset" in refused.value.message
    assert "dataset" in refused.value.message


@pytest.mark.parametrize("dataset", ["file:data.csv", "file:runs/2026/x.parquet", "file:a.NPZ"])
def test_relative_paths_under_the_root_are_accepted(dataset: str) -> None:
    assert parse_definition(trainer_study("s", dataset)).uses_data_file


def test_over_rest_without_a_data_root_file_datasets_are_refused(client: TestClient) -> None:
    response = client.post("/api/v1/studies", json=trainer_study("f", "file:data.csv"))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "file_datasets_disabled"
    assert client.get("/api/v1/studies/f").status_code == 404  # nothing was written
    schedule = {"name": "nightly", "cron": "0 3 * * *", "template": trainer_study("x", "file:data.csv")}
    del schedule["template"]["name"]
    response = client.post("/api/v1/schedules", json=schedule)
    assert response.status_code == 422 and response.json()["error"]["code"] == "file_datasets_disabled"


def test_over_rest_with_a_data_root_file_datasets_are_accepted(
    db: Database, db_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=db_url, data_dir=str(tmp_path), api_token=None)
    with TestClient(create_app(settings, db=db)) as client:
        response = client.post("/api/v1/studies", json=trainer_study("f", "file:data.csv"))
        assert response.status_code == 201, response.text
        response = client.post("/api/v1/studies", json=trainer_study("g", "file:/proc/self/environ"))
        assert response.status_code == 422


def test_the_local_cli_path_may_name_files(db: Database) -> None:
    """The operator, on the database directly, is not limited by the REST rule (paths are still checked)."""
    create_study(db, parse_definition(trainer_study("local", "file:data.csv")))
    with pytest.raises(InvalidInput) as refused:
        create_study(db, parse_definition(trainer_study("remote", "file:data.csv")), data_files=False)
    assert refused.value.code == "file_datasets_disabled"
