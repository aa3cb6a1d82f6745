"""What a study may ask a code-running worker to do: plain placeholders and no loader/interpreter env."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from caviar import _code_rules as rules

API = "/api/v1"


def command_study(name: str = "cmd", **objective: Any) -> dict[str, Any]:
    return {
        "name": name,
        "direction": "minimize",
        "metric": "loss",
        "search_space": {"lr": {"type": "float", "low": 0.001, "high": 0.1}},
        "objective": {"kind": "command", "command": ["python", "train.py", "--lr={lr}"], **objective},
        "budget": {"n_trials": 2},
    }


@pytest.mark.parametrize("name", ["LD_PRELOAD", "PYTHONPATH", "PATH", "PYTHONBREAKPOINT", "DYLD_INSERT_LIBRARIES",
                                  "BASH_ENV", "NODE_OPTIONS", "PERL5OPT", "ld_preload", "CAVIAR_API_TOKEN", "IFS"])  # fmt: skip
def test_loader_and_interpreter_variables_are_refused_naming_the_variable(
    client: TestClient, name: str
) -> None:
    response = client.post(f"{API}/studies", json=command_study(env={"OK_VAR": "1", name: "x"}))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"].startswith(f"objective.env.{name}: "), error["message"]
    assert [d["field"] for d in error["details"]] == [f"objective.env.{name}"]
    assert client.get(f"{API}/studies").json()["total"] == 0


def test_ordinary_variables_are_accepted(client: TestClient) -> None:
    env = {"OMP_NUM_THREADS": "2", "WANDB_MODE": "offline", "MY_PATH_PREFIX": "/data"}
    response = client.post(f"{API}/studies", json=command_study(env=env))
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    ("argument", "index"),
    [("--lr={lr:d}", 2), ("{number:>1000000000}", 2), ("--lr={lr!r}", 2), ("{lr.real}", 2), ("{lr[0]}", 2),
     ("{", 2), ("}", 2), ("{lr", 2), ("{}", 2), ("{ lr}", 2)],
)  # fmt: skip
def test_placeholders_are_plain_names_only(client: TestClient, argument: str, index: int) -> None:
    body = command_study()
    body["objective"]["command"] = ["python", "train.py", argument]
    response = client.post(f"{API}/studies", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"].startswith(f"objective.command.{index}: "), error["message"]
    assert "plain {name}" in error["message"] or "literal brace" in error["message"]
    assert client.get(f"{API}/studies").json()["total"] == 0


def test_literal_braces_and_plain_placeholders_are_accepted(client: TestClient) -> None:
    body = command_study()
    body["objective"]["command"] = ["python", "-c", "print({{'a': 1}})", "{lr}-{study}-{number}", "{{lr}}"]
    assert client.post(f"{API}/studies", json=body).status_code == 201


def test_fill_never_formats() -> None:
    assert rules.fill("--lr={lr}/{{x}}/{number}", {"lr": 0.5, "number": 3}) == "--lr=0.5/{x}/3"
    with pytest.raises(ValueError, match="plain"):
        rules.fill("{number:>1000000000}", {"number": 1})
    assert rules.placeholders("a{b}c{d}{{e}}") == ["b", "d"]
