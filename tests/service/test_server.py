"""``caviar serve`` as a process: waiting for the database at start, restarting crashed processes.

Real ``caviar serve`` processes (started with :mod:`caviar.service.processes`), observed through
their JSON log lines and process ids. Runs on SQLite and PostgreSQL; the shared PostgreSQL
server is never restarted (an unreachable database is a closed local port, a late one is a
database created after the server started).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from caviar.service import processes
from caviar.service.processes import CaviarProcess, free_port, wait_until
from tests.conftest import DatabaseFactory

pytestmark = pytest.mark.slow


def log_entries(log: Path) -> list[dict[str, Any]]:
    """The JSON log lines written so far (a line still being written is left for later)."""
    entries = []
    for line in log.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def _at(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))


def test_serve_gives_up_on_an_unreachable_database_with_one_line(tmp_path: Path) -> None:
    password = secrets.token_urlsafe(12)
    port = free_port(20000)  # nothing listens there
    log = tmp_path / "serve.log"
    server = CaviarProcess(
        ["serve", "--port", "0", "--wait-for-db", "3"],
        env={"CAVIAR_DATABASE_URL": f"postgresql+psycopg://caviar:{password}@127.0.0.1:{port}/nowhere"},
        log=log,
    )
    assert server.wait(timeout=120) == 1
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    last = lines[-1]
    found = re.search(
        rf"CRITICAL caviar\.server caviar serve: database postgresql\+psycopg://caviar:\*\*\*@127\.0\.0\.1:{port}"
        r"/nowhere not ready after ([\d.]+) s \(--wait-for-db 3\): .*refused",
        last,
    )
    assert found, last
    assert 2.9 <= float(found.group(1)) < 5.0  # it waited the bound, not much longer
    waits = [float(m) for m in re.findall(r"not ready \(.*\); retrying in ([\d.]+) s", log.read_text())]
    assert len(waits) >= 2 and waits[:2] == [0.5, 1.0]  # exponential backoff, each wait logged
    assert sum(1 for line in lines if "caviar serve: database" in line) == 1
    assert "Traceback" not in log.read_text() and password not in log.read_text()


def test_serve_waits_for_a_database_that_appears_later(databases: DatabaseFactory, tmp_path: Path) -> None:
    url = databases.later()  # an SQLite file in a folder not made yet, or a PostgreSQL database not created
    log = tmp_path / "serve.log"

    def appear_once_waited_for() -> None:  # not on a timer: a loaded machine starts serve late
        wait_until(lambda: log.exists() and "not ready" in log.read_text(), 120, "serve never waited")
        databases.create_migrated(url)

    appear = threading.Thread(target=appear_once_waited_for)
    appear.start()
    try:
        server, base = processes.serve(
            url,
            log=log,
            timeout=120,
            extra=["--wait-for-db", "120", "--log-format", "json", "--log-level", "info"],
        )
    finally:
        appear.join()
    try:
        assert httpx.get(f"{base}/api/v1/studies", timeout=30).status_code == 200
    finally:
        server.stop()
    waits = [e for e in log_entries(log) if e["logger"] == "caviar.server" and "not ready" in e["message"]]
    assert waits and waits[0]["level"] == "WARNING" and waits[0]["retry_in_s"] == 0.5


@pytest.mark.one_database
def test_a_killed_server_process_is_restarted_with_growing_delays(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    server, url = processes.serve(
        db_url, processes=2, log=log, extra=["--log-format", "json", "--log-level", "info"]
    )

    def supervisor(kind: str) -> list[dict[str, Any]]:
        return [
            e
            for e in log_entries(log)
            if e["logger"] == "caviar.server"
            and e["message"].startswith("server process")
            and kind in e["message"]
        ]

    try:
        first = supervisor("started")
        assert len(first) == 2 and len({e["child_pid"] for e in first}) == 2
        victim, index = first[0]["child_pid"], first[0]["process_index"]
        seen = {e["child_pid"] for e in first}
        delays, gaps = [], []
        for _ in range(3):
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda v=victim: any(e["child_pid"] == v for e in supervisor("exited")),  # type: ignore[misc]
                30,
                "the supervisor did not notice the killed process",
            )
            exited = next(e for e in supervisor("exited") if e["child_pid"] == victim)
            assert exited["exit_code"] == -signal.SIGKILL and "SIGKILL" in exited["message"]
            delays.append(exited["restart_in_s"])
            for _ in range(5):  # the other process answers meanwhile, on fresh connections
                assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
            wait_until(
                lambda: any(
                    e["process_index"] == index and e["child_pid"] not in seen for e in supervisor("started")
                ),
                60,
                "the killed process was not restarted",
            )
            restarted = next(
                e for e in supervisor("started") if e["process_index"] == index and e["child_pid"] not in seen
            )
            gaps.append((_at(restarted) - _at(exited)).total_seconds())
            seen.add(restarted["child_pid"])
            victim = restarted["child_pid"]
        assert delays == [0.5, 1.0, 2.0]  # doubling: the process kept crashing right after its start
        assert all(gap >= delay - 0.05 for gap, delay in zip(gaps, delays, strict=True)), (gaps, delays)
        wait_until(
            lambda: httpx.get(f"{url}/healthz", timeout=30).status_code == 200,
            60,
            "not healthy after restarts",
        )
    finally:
        assert server.stop() == 0


def test_two_server_processes_both_answer_and_stop_cleanly(db_url: str, tmp_path: Path) -> None:
    """`caviar serve --processes 2`: two processes share the port, each answers requests (seen by
    the pid on its access-log lines), and SIGTERM stops both with exit 0."""
    log = tmp_path / "serve.log"
    server, url = processes.serve(
        db_url, processes=2, log=log, extra=["--log-format", "json", "--log-level", "info"]
    )
    try:
        started = [
            e for e in log_entries(log) if e["logger"] == "caviar.server" and "started" in e["message"]
        ]
        children = {e["child_pid"] for e in started}
        assert len(children) == 2, started
        answered: set[int] = set()

        def both_answered() -> bool:
            for _ in range(10):  # a fresh connection each time: the kernel spreads them out
                assert httpx.get(f"{url}/api/v1/studies", timeout=30).status_code == 200
            answered.update(
                e["pid"]
                for e in log_entries(log)
                if e.get("logger") == "caviar.access" and e.get("route") == "/api/v1/studies"
            )
            return answered >= children

        wait_until(both_answered, 30, "only one server process answered")
        assert answered == children
    finally:
        asked = time.monotonic()
        assert server.stop() == 0
    assert time.monotonic() - asked < 10  # SIGTERM reached both children; nothing waited to be killed
    for pid in children:  # both children are gone, not left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "Traceback" not in log.read_text()


@pytest.mark.one_database
@pytest.mark.parametrize(
    ("command", "host"), [("serve", "0.0.0.0"), ("serve", "::"), ("dashboard", "192.0.2.7")]
)
def test_a_non_loopback_host_without_a_token_is_refused(
    db_url: str, tmp_path: Path, command: str, host: str
) -> None:
    log = tmp_path / "refused.log"
    refused = CaviarProcess(
        [command, "--host", host, "--port", str(free_port(21000))],
        env={"CAVIAR_DATABASE_URL": db_url},
        unset=("CAVIAR_API_TOKEN",),
        log=log,
    )
    try:
        assert refused.wait(timeout=30) == 1, refused.output()
    finally:
        refused.stop()  # a regression must not leave an open server on the network
    output = log.read_text()
    assert f"refusing to listen on {host}" in output and "CAVIAR_API_TOKEN" in output
    assert "Traceback" not in output


def test_the_bind_check_allows_loopback_or_a_token() -> None:
    from pydantic import SecretStr

    from caviar.service.config import Settings
    from caviar.service.server import check_bind_allowed

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        check_bind_allowed(Settings(host=host, api_token=None))
    check_bind_allowed(Settings(host="0.0.0.0", api_token=SecretStr("a-long-enough-admin-token-0123456789")))
    with pytest.raises(SystemExit, match=r"refusing to listen on 10\.0\.0\.1"):
        check_bind_allowed(Settings(host="10.0.0.1", api_token=None))
