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


def test_a_worker_retrying_through_an_outage_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM ends a worker whose slots are retrying against a service that answers 503 (their
    requests would go on for ``retry_s``, 300 s): the waits between tries end with the signal."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            self.do_GET()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log = tmp_path / "worker.log"
    worker = processes.CaviarProcess(
        ["worker", "--url", f"http://127.0.0.1:{server.server_port}", "--gpus", "none", "--cpu", "1"],
        unset=("CAVIAR_DATABASE_URL", "CAVIAR_API_TOKEN"),
        log=log,
        cwd=tmp_path,
    )
    try:
        # the slot's own requests (registration) come after the supervisor's one preflight call
        processes.wait_until(lambda: len(seen) >= 3, 60, "the slot did not start retrying")
        started = time.monotonic()
        code = worker.stop(grace_s=60)
        stopped_in = time.monotonic() - started
    finally:
        worker.stop()
        server.shutdown()
    assert code is not None and stopped_in < 10, (code, stopped_in, log.read_text())
