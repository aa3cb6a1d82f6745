"""The allow-list, the child's environment and the ``--study`` pin, without processes."""

from __future__ import annotations

from typing import Any

import pytest

from caviar.worker._allow import AllowList, check_pass_env, child_environment, pin_of, pin_refusal
from caviar.worker._program import command_argv


def command(*argv: str, **env: str) -> dict[str, Any]:
    return {"kind": "command", "command": list(argv), "env": env}


def python(entrypoint: str) -> dict[str, Any]:
    return {"kind": "python", "entrypoint": entrypoint}


def test_commands_are_allowed_by_program_and_fixed_words() -> None:
    allow = AllowList.parse(["command:/usr/bin/python3", "command:python train.py"])
    assert allow.refusal(command("/usr/bin/python3", "-m", "x")) is None
    assert allow.refusal(command("python", "train.py", "--lr", "{lr}")) is None
    for refused in (
        command("python", "-c", "import os"),  # the interpreter alone is not listed: only with train.py
        command("python3", "train.py"),
        command("/usr/bin/python3.11", "x"),
        command("sh", "-c", "id"),
        command("./python", "train.py"),
        command("{prog}", "train.py"),
    ):
        why = allow.refusal(refused)
        assert why is not None and "not on this worker's allow-list" in why, refused


def test_python_entrypoints_are_allowed_by_module_prefix() -> None:
    allow = AllowList.parse(["python:mypkg", "python:other.", "python:exact.mod:main"])
    assert [allow.refusal(python(e)) is None for e in ("mypkg:f", "mypkg.train:f", "other.sub:f")] == [
        True
    ] * 3
    assert allow.refusal(python("exact.mod:main")) is None
    for refused in ("mypkgx:f", "other:f", "exact.mod:other", "evil:run"):
        assert "not on this worker's allow-list" in (allow.refusal(python(refused)) or ""), refused
    assert allow.kinds == ["python"]


def test_all_allows_any_code_but_no_forbidden_env() -> None:
    allow = AllowList.parse(["all"])
    assert allow.refusal(command("sh", "-c", "id")) is None and allow.kinds == ["python", "command"]
    assert "objective.env.LD_PRELOAD" in (allow.refusal(command("sh", env_x="1", LD_PRELOAD="/x.so")) or "")
    assert "objective.command.1" in (allow.refusal(command("sh", "{x:>99}")) or "")


@pytest.mark.parametrize(
    "spec", ["", "python", "mypkg.", "python:1bad", "command:", "command:./run.sh", "x:y", "--cpu"]
)
def test_malformed_specs_say_which_forms_exist(spec: str) -> None:
    with pytest.raises(ValueError, match="--allow-code"):
        AllowList.parse([spec])


def test_the_child_environment_is_a_pass_through_list() -> None:
    worker = {
        "HOME": "/home/w",
        "LC_ALL": "C.UTF-8",
        "PATH": "/usr/bin",
        "CUDA_HOME": "/cuda",
        "CAVIAR_API_TOKEN": "cvr_worker",
        "CAVIAR_WORKER_TOKEN": "static",
        "AWS_SECRET_ACCESS_KEY": "s3",
        "LD_PRELOAD": "/evil.so",
        "PYTHONPATH": "/src",
        "MY_TOKEN_COPY": "cvr_worker",
        "EXTRA_A": "a",
    }
    env = child_environment(worker, ("EXTRA_*", "MY_TOKEN_COPY"), secrets=["cvr_worker"])
    assert env == {
        "HOME": "/home/w",
        "LC_ALL": "C.UTF-8",
        "PATH": "/usr/bin",
        "CUDA_HOME": "/cuda",
        "EXTRA_A": "a",
    }
    assert child_environment(worker, ("PYTHONPATH",))["PYTHONPATH"] == "/src"


@pytest.mark.parametrize("name", ["CAVIAR_API_TOKEN", "CAVIAR*", "caviar_url", "*", "C*", "BAD-NAME", "A B"])
def test_pass_env_never_reaches_caviar_variables(name: str) -> None:
    with pytest.raises(ValueError, match="--pass-env"):
        check_pass_env([name])


def test_placeholders_are_filled_without_format() -> None:
    assert command_argv(["x", "--lr={lr}", "{{n}}", "{number}"], {"lr": 0.1}, "s", 3) == [
        "x",
        "--lr=0.1",
        "{n}",
        "3",
    ]
    with pytest.raises(ValueError):
        command_argv(["{number:>1000000000}"], {}, "s", 3)


def test_a_pin_refuses_a_recreated_study_or_a_changed_objective() -> None:
    study = {"created_at": "2026-12-07T00:00:00Z", "definition": {"objective": command("python", "t.py")}}
    pinned = pin_of(study)
    assert pin_refusal("s", pinned, pin_of(study)) is None
    recreated = {**study, "created_at": "2026-12-07T00:05:00Z"}
    assert "deleted and created again" in (pin_refusal("s", pinned, pin_of(recreated)) or "")
    edited = {**study, "definition": {"objective": command("python", "evil.py")}}
    assert "objective of study s changed" in (pin_refusal("s", pinned, pin_of(edited)) or "")
