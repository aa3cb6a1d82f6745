"""Server-side timeouts: idle keep-alive connections, slow request heads, stalled request bodies.

uvicorn closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``),
but not one that never sends a request, nor one that sends a request head a byte at a time
(any byte disarms its keep-alive timer), nor one that stops sending the body it announced: each
of those holds a connection (and, for a body, a request task) forever. :func:`guarded_protocol`
wraps uvicorn's HTTP protocol with three timers per connection:

* idle: a connection that sends nothing within ``keep_alive_s`` of opening is closed (after a
  response, uvicorn's own keep-alive timer does the same);
* head: a request head (request line and headers) must be complete ``header_s`` after its first
  byte arrived, or the connection is closed;
* body: while a request's body is incomplete, the client must send some of it at least every
  ``body_s`` seconds, or the connection is closed (the app's ``receive`` then answers
  ``http.disconnect``). The timer waits while the server itself paused reading (flow control: the
  app is slower than the client), so a slow consumer never cuts a fast client.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def guarded_protocol(*, keep_alive_s: float, header_s: float, body_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) with idle, head and body timeouts.

    Args:
        keep_alive_s: how long a new connection may stay silent.
        header_s: how long a request head may take from its first byte.
        body_s: the longest pause between two pieces of a request body.

    Returns:
        A protocol class for ``uvicorn.Config(http=...)``.
    """
    base: Any = AutoHTTPProtocol

    class GuardedHTTPProtocol(base):
        """uvicorn's protocol, closing connections that idle, dawdle over a head or stall a body."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._guard: asyncio.TimerHandle | None = None
            self._guarding: str | None = None  # "idle", "head" or "body"
            self._seen_cycle: object = None

        def _arm(self, what: str, delay: float) -> None:
            self._disarm()
            self._guarding = what
            self._guard = self.loop.call_later(delay, self._expired)

        def _disarm(self) -> None:
            if self._guard is not None:
                self._guard.cancel()
            self._guard, self._guarding = None, None

        def _expired(self) -> None:
            what, self._guard, self._guarding = self._guarding, None, None
            if self.transport.is_closing():
                return
            if what == "body" and self.flow.read_paused:
                self._arm("body", body_s)  # the app is behind, not the client
                return
            self.logger.info(
                "closing a connection: its request %s timed out", "body" if what == "body" else "head"
            )
            self.transport.close()

        def _between_requests(self) -> bool:
            """No request is being read: none yet, or the last one answered and its body read."""
            cycle: Any = self.cycle
            return cycle is None or (cycle.response_complete and not cycle.more_body)

        def _track(self) -> None:
            """Advance the timers after the parser consumed data (or a pipelined request began)."""
            cycle: Any = self.cycle
            if cycle is not None and cycle is not self._seen_cycle:
                self._seen_cycle = cycle  # a request head completed
                self._disarm()
            if cycle is not None and not cycle.response_complete:
                if cycle.more_body:
                    self._arm("body", body_s)
                elif self._guarding == "body":
                    self._disarm()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm("idle", keep_alive_s)

        def data_received(self, data: bytes) -> None:
            if self._guarding == "idle":
                self._disarm()
            was_between = self._between_requests()
            super().data_received(data)
            if self.transport.is_closing():
                self._disarm()
                return
            self._track()
            if was_between and self._between_requests() and self._guarding is None:
                self._arm("head", header_s)  # a head began and is not complete yet (a total deadline)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._guarding == "body":
                self._disarm()  # the app answered without reading the whole body
            self._track()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedHTTPProtocol
