"""``caviar doctor``: a line per check, ✓ or ✗ with the fix, exit 1 when anything fails."""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from caviar.cli import app
from caviar.service.tokens import service as tokens
from tests.cli.conftest import Service
from tests.service.helpers import external_study
from tests.service.test_dashboard import free_port

runner = CliRunner()


def doctor(service: Service, *args: str, token: str | None = None, url: str | None = None) -> tuple[int, str]:
    env = {**service.env, **({"CAVIAR_API_TOKEN": token} if token is not None else {})}
    if url is not None:
        env["CAVIAR_URL"] = url
    result = runner.invoke(app, ["doctor", *args], env=env)
    return result.exit_code, result.output


def test_a_healthy_setup_is_all_ticks(service: Service) -> None:
    code, out = doctor(service)
    assert code == 0, out
    assert "✗" not in out
    assert f"✓ service at {service.base}" in out
    assert "✓ the service reaches its database" in out
    assert "✓ token valid: admin scope" in out
    assert "service version" in out


def test_no_service_is_one_cross_with_the_fix(service: Service) -> None:
    code, out = doctor(service, url=f"http://127.0.0.1:{free_port()}")
    assert code == 1
    assert "✗ no caviar service answers" in out and "caviar serve" in out and "CAVIAR_URL" in out


def test_a_wrong_token_is_a_cross_with_the_fix(service: Service) -> None:
    code, out = doctor(service, token="wrong-token")
    assert code == 1
    assert "✗ token refused: invalid or revoked token" in out and "--token" in out


def test_the_worker_view_names_what_it_takes_and_refuses_and_why(service: Service) -> None:
    command = external_study("doctor-command")
    command["objective"] = {"kind": "command", "command": ["python3", "train.py", "--lr", "{lr}"]}
    refused = copy.deepcopy(command)
    refused["name"] = "doctor-refused"
    refused["objective"]["command"] = ["sh", "-c", "echo {lr}"]
    with service.http() as http:
        for body in (command, refused, external_study("doctor-external")):
            assert http.post("/api/v1/studies", json=body).status_code == 201
    names = ["doctor-command", "doctor-refused", "doctor-external"]
    args = ["--worker", "--allow-code", "command:python3", *[f"--study={n}" for n in names]]
    code, out = doctor(service, *args)
    assert code == 1, out
    assert "✓ device slots: cpu" in out
    assert "✓ user code allowed: command:python3" in out
    assert "✓ study doctor-command: kind command, would be taken" in out
    assert (
        "✗ study doctor-refused: kind command, would be refused" in out and "--allow-code 'command:sh'" in out
    )
    assert "✓ study doctor-external: kind external, run by clients" in out


@pytest.mark.parametrize("scope", ["read", "write"])
def test_the_worker_view_checks_the_token_scope(service: Service, scope: str) -> None:
    token = tokens.create_token(service.db, scope).token
    code, out = doctor(service, "--worker", token=token)
    if scope == "read":
        assert code == 1 and "✗ the token may run trials (worker scope)" in out, out
        assert "caviar token create --scope worker" in out
    else:
        assert "✓ the token may run trials (worker scope)" in out, out


def test_a_bad_allow_list_is_a_cross(service: Service) -> None:
    code, out = doctor(service, "--worker", "--allow-code", "nonsense")
    assert code == 1 and "✗ --allow-code 'nonsense'" in out
