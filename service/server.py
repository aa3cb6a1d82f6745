"""``caviar serve``: migrate once, bind one socket, run N uvicorn processes on it.

uvicorn's own ``--workers`` loses TCP_NODELAY on its sockets (uvicorn issue 3149), adding about
44 ms to every keep-alive request; binding the socket here with TCP_NODELAY set (accepted
connections inherit it on Linux) and handing it to each process avoids that.
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
from typing import Any

import uvicorn

from caviar import storage
from caviar.service.api import create_app
from caviar.service.config import Settings

_log = logging.getLogger("caviar.server")


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


def _run_one(sock: socket.socket, settings_data: dict[str, Any], log_level: str) -> None:
    settings = Settings.model_validate(settings_data)
    os.environ["CAVIAR_DATABASE_URL"] = settings.database_url
    config = uvicorn.Config(
        create_app(settings),
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run(sockets=[sock])


def serve(settings: Settings, *, log_level: str = "info") -> None:
    """Serve the API with ``settings.processes`` processes (migrating first unless disabled)."""
    check_bind_allowed(settings)
    if settings.migrate_on_start:
        storage.upgrade(settings.database_url)
    sock = bind_socket(settings.host, settings.port)
    data = settings.model_dump(mode="json")
    for secret in ("api_token", "worker_token"):  # model_dump masks secrets; the children need them
        value = getattr(settings, secret)
        if value is not None:
            data[secret] = value.get_secret_value()
    url = f"http://{settings.host}:{sock.getsockname()[1]}"  # the port bound: --port 0 picks a free one
    print(f"caviar serving on {url} with {settings.processes} process(es)", flush=True)
    if settings.processes == 1:
        _run_one(sock, data, log_level)
        return
    ctx = multiprocessing.get_context("spawn")
    children: list[BaseProcess] = []
    stopping = False

    def start() -> BaseProcess:
        child = ctx.Process(target=_run_one, args=(sock, data, log_level), daemon=False)
        child.start()
        return child

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.pid and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children.extend(start() for _ in range(settings.processes))
    while not stopping:
        time.sleep(0.5)
        for i, child in enumerate(children):
            if not child.is_alive() and not stopping:
                _log.warning("server process %s exited with %s; restarting", child.pid, child.exitcode)
                children[i] = start()
    for child in children:
        child.join(timeout=15)
        if child.is_alive():
            child.kill()
