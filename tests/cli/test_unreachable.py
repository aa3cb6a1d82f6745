"""No service at the URL: every command says so in one line, exits 2 and leaves nothing on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from caviar import _http
from caviar._errors import CaviarApiError
from caviar.cli import app
from caviar.service.processes import free_port
from tests.service.helpers import external_study

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [
    ["study", "create", "-f", "study.yaml"],
    ["study", "list"],
    ["study", "show", "s"],
    ["study", "trials", "s"],
    ["study", "pause", "s"],
    ["study", "set", "s", "--priority", "1"],
    ["study", "delete", "s", "--yes"],
    ["study", "watch", "s"],
    ["study", "checkpoint", "s"],
    ["schedule", "list"],
    ["schedule", "add", "-f", "study.yaml"],
    ["token", "create", "--scope", "read"],
    ["token", "list"],
    ["queue"],
    ["workers"],
]


@pytest.fixture
def empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new folder holding only a study definition, as the working directory; no CAVIAR_URL."""
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(external_study("s")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAVIAR_URL", raising=False)
    monkeypatch.delenv("CAVIAR_DATABASE_URL", raising=False)
    return tmp_path


def _nowhere() -> str:
    return f"http://127.0.0.1:{free_port(20000)}"  # nothing listens there


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_no_service_at_the_default_url(
    command: list[str], empty_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no --url and no CAVIAR_URL the command looks at the default URL (here one where
    nothing listens) and says where it looked and how to start or point to a service."""
    nowhere = _nowhere()
    monkeypatch.setattr(_http, "DEFAULT_URL", nowhere)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: no caviar service at {nowhere} (the default URL")
    assert "`caviar serve`" in line and "--url" in line and "CAVIAR_URL" in line
    assert result.stdout == ""
    assert sorted(p.name for p in empty_folder.iterdir()) == ["study.yaml"]


def test_the_line_names_where_the_url_came_from(empty_folder: Path) -> None:
    nowhere = _nowhere()
    flagged = CliRunner().invoke(app, ["study", "list", "--url", nowhere])
    assert flagged.exit_code == 2 and f"at {nowhere} (the URL from --url" in flagged.stderr
    from_env = CliRunner().invoke(app, ["study", "list"], env={"CAVIAR_URL": nowhere})
    assert from_env.exit_code == 2 and f"at {nowhere} (the URL from CAVIAR_URL" in from_env.stderr
    started = time.monotonic()
    no_scheme = CliRunner().invoke(app, ["study", "list", "--url", "localhost:8000"])
    assert no_scheme.exit_code == 2 and "a URL starts with http:// or https://" in no_scheme.stderr
    assert time.monotonic() - started < 8  # said at once, not after the CLI's 10 s of retries


def test_the_installed_command_in_a_new_folder(empty_folder: Path) -> None:
    """As a new user runs it: `caviar study create -f study.yaml` in a new folder, no service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAVIAR_")}
    env["CAVIAR_URL"] = _nowhere()
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "caviar.cli", "study", "create", "-f", "study.yaml"],
        cwd=empty_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "no caviar service at" in line and "`caviar serve`" in line
    assert result.stdout == ""
    assert sorted(p.name for p in empty_folder.iterdir()) == ["study.yaml"]  # no caviar.db


def test_a_service_that_answered_once_is_retried_through_a_drop_out() -> None:
    """The CLI's client reports a refused first connection at once, but retries one that fails
    after the service has answered (a restart while `caviar study watch` polls)."""
    calls: list[str] = []
    outcomes = iter(["refuse", "answer", "refuse", "refuse", "answer"])

    def handler(request: httpx.Request) -> httpx.Response:
        outcome = next(outcomes)
        calls.append(outcome)
        if outcome == "refuse":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"ok": True})

    transport = httpx.MockTransport(handler)
    client = _http.HttpClient("http://caviar.test", retry_s=30, transport=transport, wait_for_service=False)
    with pytest.raises(CaviarApiError) as refused:
        client.get("/healthz")
    assert refused.value.code == "unreachable" and calls == ["refuse"]
    assert client.get("/healthz") == {"ok": True}
    assert client.get("/healthz") == {"ok": True}  # retried through two refusals
    assert calls == ["refuse", "answer", "refuse", "refuse", "answer"]


def test_a_url_that_is_not_a_caviar_service_is_one_line(empty_folder: Path) -> None:
    """Something else answers at the URL (a web page): one line, not a JSON traceback."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>not caviar</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = CliRunner().invoke(app, ["study", "list", "--url", url])
    finally:
        server.shutdown()
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "not as a caviar service does" in line and "Traceback" not in result.output
