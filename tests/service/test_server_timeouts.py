"""Server-side timeouts against a live uvicorn on loopback: idle, slow heads, stalled bodies."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from caviar.service.api import create_app
from caviar.service.server import uvicorn_config

LIMIT_S = 10.0
"""How long a test waits for the server to close a connection (the timeouts are 1 s)."""


@pytest.fixture
def address(settings, db) -> Iterator[tuple[str, int]]:  # type: ignore[no-untyped-def]
    quick = settings.model_copy(
        update={"timeout_keep_alive_s": 1, "timeout_headers_s": 1.0, "timeout_body_s": 1.0}
    )
    server = uvicorn.Server(uvicorn_config(create_app(quick, db=db), quick))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        assert thread.is_alive(), "the server died"
        time.sleep(0.02)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def connect(address: tuple[str, int]) -> socket.socket:
    conn = socket.create_connection(address, timeout=LIMIT_S)
    conn.settimeout(LIMIT_S)
    return conn


def response(conn: socket.socket) -> bytes:
    """One whole response (its head and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head


def closed_after(conn: socket.socket, *, feed: bytes | None = None) -> float:
    """Seconds until the server closes ``conn`` (sending ``feed`` every 0.2 s meanwhile)."""
    began = time.monotonic()
    conn.settimeout(0.2)
    while time.monotonic() - began < LIMIT_S:
        try:
            if conn.recv(65536) == b"":
                return time.monotonic() - began
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - began
        if feed is not None:
            try:
                conn.sendall(feed)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - began
    raise AssertionError(f"the server kept the connection open for {LIMIT_S} s")


def test_an_idle_keep_alive_connection_is_closed(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert response(conn).startswith(b"HTTP/1.1 200")
        assert closed_after(conn) < 5
    with connect(address) as silent:  # a connection that never sends a request
        assert closed_after(silent) < 5


def test_a_request_head_sent_a_byte_at_a_time_is_cut(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        # every piece arrives well within the idle timeout; the head as a whole never completes
        assert closed_after(conn, feed=b"X-Slow: y\r\n") < 5


def test_a_request_whose_body_never_finishes_is_cut(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        conn.sendall(
            b"POST /api/v1/studies HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"name": '
        )
        assert closed_after(conn) < 5


def test_a_steady_body_and_the_next_request_on_the_connection_still_work(address: tuple[str, int]) -> None:
    body = b'{"name": "x"}'  # a study with every default: answered once the whole body arrived
    with connect(address) as conn:
        conn.sendall(
            b"POST /api/v1/studies HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        for byte in body:  # 13 pieces 0.2 s apart: 2.6 s in all, never a 1 s pause
            conn.sendall(bytes([byte]))
            time.sleep(0.2)
        assert response(conn).startswith(b"HTTP/1.1 201")
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert response(conn).startswith(b"HTTP/1.1 200")
