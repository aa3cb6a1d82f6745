"""``caviar serve``: wait for the database, migrate once, bind one socket, run N uvicorn processes on it.

uvicorn's own ``--workers`` loses TCP_NODELAY on its sockets (uvicorn issue 3149), adding about
44 ms to every keep-alive request; binding the socket here with TCP_NODELAY set (accepted
connections inherit it on Linux) and handing it to each process avoids that.

Start-up: the database is tried with exponential backoff (0.5 s, 1 s, 2 s, ... at most
:data:`DB_WAIT_MAX_S` between tries, each wait logged) until it answers (and, with
``--no-migrate``, has caviar's schema), for up to ``settings.wait_for_db_s``; then serving
fails with one line that says why (exit status 1).

Supervision (``--processes N`` > 1): a server process that exits is restarted after an
exponential backoff (:class:`~caviar._backoff.RestartBackoff`: 0.5 s doubling up to 30 s, back to
0.5 s after a run of a minute); the other processes keep serving on the shared socket meanwhile.

Logs: every process (the supervisor and each server process) sends its records to stderr in
``settings.log_format`` at ``settings.log_level`` (:func:`caviar._logging.configure_logging`),
uvicorn's and Optuna's included; uvicorn's access log stays off (the service writes its own,
:mod:`caviar.service.access_log`).
"""

from __future__ import annotations

import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

import optuna
import uvicorn
from starlette.types import ASGIApp
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from caviar import storage
from caviar._backoff import RestartBackoff
from caviar._logging import announce, configure_logging
from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.timeouts import guarded_protocol

_log = logging.getLogger("caviar.server")

DB_WAIT_FIRST_S = 0.5
DB_WAIT_MAX_S = 15.0
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
RESTART_STABLE_S = 60.0
"""A server process that ran this long before it exited is restarted after the shortest delay again."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_allowed(settings: Settings) -> None:
    """Refuse a non-loopback bind when no API token protects the service."""
    if settings.api_token is None and not is_loopback(settings.host):
        raise SystemExit(
            f"refusing to listen on {settings.host}: no CAVIAR_API_TOKEN is set, so the API would be open "
            "to the network. Set CAVIAR_API_TOKEN (or --token) or bind to 127.0.0.1."
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEADDR and TCP_NODELAY."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def setup_logging(settings: Settings) -> None:
    """Log this process's records (Optuna's and uvicorn's too) as ``settings`` say."""
    configure_logging(settings.log_format, settings.log_level)
    optuna.logging.disable_default_handler()  # its own stderr lines would not be in our format
    optuna.logging.enable_propagation()


def _give_up(message: str, **fields: Any) -> NoReturn:
    _log.critical(message, extra=fields)
    raise SystemExit(1)


def wait_for_database(settings: Settings) -> None:
    """Return once the database can be served; retry with backoff up to ``settings.wait_for_db_s``.

    With ``settings.migrate_on_start`` the database must answer (it is migrated next); without,
    it must also have caviar's schema (someone else migrates it).

    Raises:
        SystemExit: it was not ready in time (after logging one line that says why).
    """
    where = storage.display_url(settings.database_url)
    bound = settings.wait_for_db_s
    began = time.monotonic()

    def waiting(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else 0.0
        _log.warning(
            "database %s not ready (%s); retrying in %.1f s",
            where,
            error,
            sleep,
            extra={"attempt": state.attempt_number, "retry_in_s": round(sleep, 3)},
        )

    backoff = wait_exponential(multiplier=DB_WAIT_FIRST_S, max=DB_WAIT_MAX_S)

    def pause(state: RetryCallState) -> float:  # the last wait ends at the bound: one more try then
        return max(0.0, min(backoff(state), bound - (state.seconds_since_start or 0.0)))

    retrying = Retrying(
        retry=retry_if_exception_type(storage.DatabaseNotReady),
        wait=pause,
        stop=stop_after_delay(bound),
        before_sleep=waiting,
        reraise=True,
    )
    try:
        retrying(storage.check_ready, settings.database_url, migrated=not settings.migrate_on_start)
    except storage.DatabaseNotReady as exc:
        waited = time.monotonic() - began
        _give_up(
            f"caviar serve: database {where} not ready after {waited:.1f} s (--wait-for-db {bound:g}): {exc}",
            waited_s=round(waited, 1),
        )


def _run_one(sock: socket.socket, settings_data: dict[str, Any]) -> None:
    settings = Settings.model_validate(settings_data)
    setup_logging(settings)
    os.environ["CAVIAR_DATABASE_URL"] = settings.database_url
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run(sockets=[sock])


def uvicorn_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """How every server process runs ``app``: its own logging, and the connection timeouts of
    ``settings`` (idle keep-alive, slow request heads, stalled bodies; see :mod:`caviar.service.timeouts`)."""
    return uvicorn.Config(
        app,
        http=guarded_protocol(
            keep_alive_s=settings.timeout_keep_alive_s,
            header_s=settings.timeout_headers_s,
            body_s=settings.timeout_body_s,
        ),
        log_config=None,  # records go to the handler setup_logging installed
        log_level=settings.log_level,
        access_log=False,
        timeout_keep_alive=settings.timeout_keep_alive_s,
        timeout_graceful_shutdown=10,
    )


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


def serve(settings: Settings) -> None:
    """Serve the API with ``settings.processes`` processes (waiting for the database and migrating first)."""
    setup_logging(settings)
    check_bind_allowed(settings)
    wait_for_database(settings)
    if settings.migrate_on_start:
        storage.upgrade(settings.database_url)
    sock = bind_socket(settings.host, settings.port)
    data = settings.model_dump(mode="json")
    for secret in ("api_token", "worker_token"):  # model_dump masks secrets; the children need them
        value = getattr(settings, secret)
        if value is not None:
            data[secret] = value.get_secret_value()
    url = f"http://{settings.host}:{sock.getsockname()[1]}"  # the port bound: --port 0 picks a free one
    announce(
        settings.log_format,
        _log.name,
        f"caviar serving on {url} with {settings.processes} process(es)",
        url=url,
        processes=settings.processes,
    )
    if settings.processes == 1:
        _run_one(sock, data)
        return
    _supervise(sock, data, settings.processes)


def _supervise(sock: socket.socket, data: dict[str, Any], processes: int) -> None:
    """Run ``processes`` server processes; restart each that exits, with backoff, until SIGTERM/SIGINT."""
    ctx = multiprocessing.get_context("spawn")
    children: list[BaseProcess] = []
    started: list[float] = []
    restart_at: list[float | None] = [None] * processes
    backoffs = [RestartBackoff(RESTART_FIRST_S, RESTART_MAX_S, RESTART_STABLE_S) for _ in range(processes)]
    stopping = False

    def start(index: int) -> BaseProcess:
        child = ctx.Process(target=_run_one, args=(sock, data), daemon=False)
        child.start()
        _log.info(
            "server process %s started", child.pid, extra={"child_pid": child.pid, "process_index": index}
        )
        return child

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.pid and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(processes):
        children.append(start(index))
        started.append(time.monotonic())
    while not stopping:
        time.sleep(0.1)
        for index, child in enumerate(children):
            now = time.monotonic()
            if stopping:
                break
            due = restart_at[index]
            if due is None and not child.is_alive():
                delay = backoffs[index].next_delay(now - started[index])
                restart_at[index] = now + delay
                _log.warning(
                    "server process %s exited with %s; restarting in %.1f s",
                    child.pid,
                    _exit_text(child.exitcode),
                    delay,
                    extra={
                        "child_pid": child.pid,
                        "exit_code": child.exitcode,
                        "restart_in_s": delay,
                        "process_index": index,
                    },
                )
            elif due is not None and now >= due:
                restart_at[index] = None
                children[index] = start(index)
                started[index] = time.monotonic()
    for child in children:
        child.join(timeout=15)
        if child.is_alive():
            child.kill()
