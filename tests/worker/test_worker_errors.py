"""Permanent errors end ``caviar worker`` at once with one line; transient ones keep it trying."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from caviar.service import processes
from caviar.service.api import create_app
from caviar.service.tokens import service as tokens
from tests.service.test_dashboard import free_port, live_server

ADMIN = "admin-token-for-worker-errors-0123456789"


@pytest.fixture
def secured(settings, db) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A live service that needs a token."""
    app = create_app(settings.model_copy(update={"api_token": SecretStr(ADMIN)}), db=db)
    with live_server(app, free_port()) as base:
        yield base


def run_worker(url: str, token: str, tmp_path: Path, timeout: float) -> tuple[int, list[str]]:
    log = tmp_path / "worker.log"
    worker = processes.CaviarProcess(
        ["worker", "--url", url, "--token", token, "--gpus", "none", "--cpu", "2"],
        unset=("CAVIAR_DATABASE_URL", "CAVIAR_API_TOKEN"),
        log=log,
        cwd=tmp_path,
    )
    try:
        code = worker.wait(timeout)
    finally:
        worker.stop()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return code, lines


def test_a_worker_with_a_wrong_token_exits_at_once_with_one_line(secured: str, tmp_path: Path) -> None:
    code, lines = run_worker(secured, "wrong-token-123", tmp_path, timeout=60)
    assert code == 2
    # refused before any slot process started (no "N slot(s)" line): no torch import, no backoff;
    # about 2 s on an idle machine (the interpreter and the CLI's imports)
    assert len(lines) == 1, lines
    assert "invalid or revoked token" in lines[0] and "--token" in lines[0]
    assert "Traceback" not in lines[0]


def test_a_worker_with_a_token_of_the_wrong_scope_exits_with_one_line(
    secured: str, db, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    read_only = tokens.create_token(db, "read").token
    code, lines = run_worker(secured, read_only, tmp_path, timeout=60)
    assert code == 2
    assert len(lines) == 1, lines
    assert "worker scope" in lines[0]


def test_a_token_revoked_while_the_slots_run_ends_them_with_one_line_each(
    secured: str, db, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    created = tokens.create_token(db, "worker")
    log = tmp_path / "worker.log"
    worker = processes.CaviarProcess(
        [
            "worker",
            "--url",
            secured,
            "--token",
            created.token,
            "--gpus",
            "none",
            "--cpu",
            "1",
            "--poll-interval",
            "0.1",
        ],
        unset=("CAVIAR_DATABASE_URL", "CAVIAR_API_TOKEN"),
        log=log,
        cwd=tmp_path,
    )
    try:
        processes.wait_until(lambda: "slot(s)" in log.read_text(), 60, "the worker did not start")
        tokens.revoke_token(db, created.id)
        assert worker.wait(60) == 2
    finally:
        worker.stop()
    errors = [line for line in log.read_text().splitlines() if "invalid or revoked token" in line]
    assert len(errors) == 1, log.read_text()
    assert "Traceback" not in log.read_text()
