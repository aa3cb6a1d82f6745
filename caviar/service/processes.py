"""Starting caviar's own processes (``caviar serve``, ``caviar worker``) from Python.

The one launcher that the demo, the tests and the benchmarks share: each process runs the CLI
(``python -m caviar.cli ...``) in its own process session, logs to a file, and is stopped
with SIGTERM (then SIGKILL after a grace period), as a supervisor would.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx


def free_port(start: int = 8000) -> int:
    """The first port from ``start`` on which 127.0.0.1 can listen."""
    for port in range(start, start + 1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + 999}")


class CaviarProcess:
    """One ``caviar`` command running in the background.

    Args:
        args: the command's arguments (``["serve", "--port", "8001"]``).
        env: environment variables on top of this process's.
        unset: environment variables it must not see (a worker gets no database URL, say).
        log: where its output goes (appended).
        cwd: its working directory.
    """

    def __init__(
        self,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        unset: Sequence[str] = (),
        log: str | Path = "caviar.log",
        cwd: str | Path | None = None,
    ) -> None:
        self.args = args
        self.log_path = Path(log)
        environment = {k: v for k, v in os.environ.items() if k not in unset}
        with open(self.log_path, "ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "caviar.cli", *args],
                env={**environment, **(env or {})},
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its exit code."""
        return self.process.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        if self.alive():
            self.process.send_signal(signum)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL of the whole process group after ``grace_s``; the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.process.wait(timeout=10)
        self._kill_group()  # whatever it started and left behind (its own process session)
        return self.process.returncode

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def output(self, tail: int = 4000) -> str:
        """The end of the log."""
        return self.log_path.read_text(errors="replace")[-tail:]

    def __enter__(self) -> CaviarProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, message: str, interval: float = 0.1) -> None:
    """Poll ``predicate`` until it holds; TimeoutError with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(message)


SERVING = re.compile(r"caviar serving on (http://\S+) with")


def serve(
    database_url: str,
    *,
    port: int = 0,
    processes: int = 1,
    env: Mapping[str, str] | None = None,
    log: str | Path = "caviar-serve.log",
    extra: list[str] | None = None,
    timeout: float = 60.0,
) -> tuple[CaviarProcess, str]:
    """Start ``caviar serve`` on a migrated database and wait until it is healthy.

    With ``port=0`` the server binds any free port (no race with other processes picking ports)
    and the URL is read from its first line of output.

    Returns:
        The process and its base URL.
    """
    log = Path(log)
    offset = log.stat().st_size if log.exists() else 0
    args = [
        "serve",
        "--port",
        str(port),
        "--processes",
        str(processes),
        "--no-migrate",
        "--log-level",
        "warning",
    ]
    server = CaviarProcess(
        [*args, *(extra or [])], env={"CAVIAR_DATABASE_URL": database_url, **(env or {})}, log=log
    )
    found: list[str] = []

    def healthy() -> bool:
        if not server.alive():
            raise RuntimeError(f"caviar serve exited during start-up:\n{server.output()}")
        if not found:
            with open(log, "rb") as handle:
                handle.seek(offset)
                match = SERVING.search(handle.read().decode("utf-8", "replace"))
            if match is None:
                return False
            found.append(match.group(1))
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{found[0]}/healthz", timeout=2).status_code == 200
        return False

    try:
        wait_until(healthy, timeout, f"caviar serve did not become healthy in {timeout:.0f}s")
    except BaseException:
        server.stop()
        raise
    return server, found[0]
