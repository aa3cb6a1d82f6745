"""HTTP to a caviar service: bearer auth, the error envelope, and retries through outages.

Network faults are normal operating conditions: a request that fails to connect, times out, or is
answered 429 / 502 / 503 / 504 is retried with exponential backoff (honouring ``Retry-After``, with
jitter) until ``retry_s`` seconds have passed; an ask a server process refused for now (429
``too_many_asks``) is retried even by callers that do not wait on a full study. Every caviar call
is safe to repeat: asks carry a ``request_id``, tells and hand-backs are idempotent, heartbeats and
reports overwrite.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any
from urllib.parse import quote

import httpx

from caviar._errors import CaviarApiError, LeaseLost

DEFAULT_URL = "http://127.0.0.1:8000"
API_PREFIX = "/api/v1"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
ADMISSION_CODES = frozenset({"too_many_asks"})
"""Error codes retried whatever ``retry_on`` says: a server process refused the request for now
(it runs as many asks as it admits), never the study (``max_parallel_reached`` is the study's)."""


def _sleep(seconds: float, stop: threading.Event) -> None:
    """Wait between two tries, or less once ``stop`` is set (one place to wait: tests replace it)."""
    stop.wait(seconds)


def api_path(*parts: str | int) -> str:
    """``/api/v1/<part>/<part>...`` with each part URL-quoted (names may hold dots and dashes)."""
    return API_PREFIX + "".join("/" + quote(str(part), safe="") for part in parts)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def api_error(response: httpx.Response) -> CaviarApiError:
    """The exception for an error answer (``LeaseLost`` for ``409 lease_lost``)."""
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        details = list(error.get("details") or [])
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", f"HTTP {response.status_code}", []
    cls = LeaseLost if code == "lease_lost" else CaviarApiError
    return cls(response.status_code, code, message, details)


class HttpClient:
    """A thread-safe JSON client of one caviar service.

    Args:
        url: the service's base URL (default: ``CAVIAR_URL``, else ``http://127.0.0.1:8000``).
        token: bearer token (default: ``CAVIAR_API_TOKEN``).
        timeout_s: per-request timeout.
        retry_s: how long to keep retrying a request through outages before giving up.
        transport: an httpx transport (tests pass an ASGI one).
        wait_for_service: also retry a refused connection before the service first answered this
            client (False: a service that is not there is reported unreachable at once, as a
            command line wants; one that answered before and then drops out is retried as usual).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry_s: float = 300.0,
        transport: httpx.BaseTransport | None = None,
        wait_for_service: bool = True,
    ) -> None:
        self.url = (url or os.environ.get("CAVIAR_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("CAVIAR_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retry_s = retry_s
        self._client = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport
        )
        self._closed = threading.Event()
        self._answered = wait_for_service

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request (arguments as :meth:`send`); return the decoded JSON body (None if empty).

        Raises:
            CaviarApiError: an error answer, or the service unreachable past ``retry_s``
                (status 0, code ``unreachable``).
            LeaseLost: the trial named in ``path`` lost its lease.
        """
        response = self.send(method, path, **kwargs)
        return response.json() if response.content else None

    def send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | list[tuple[str, Any]] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        retry: bool = True,
        retry_on: frozenset[int] = RETRY_STATUSES,
    ) -> httpx.Response:
        """Send a request and return the successful response (for bodies that are not JSON)."""
        deadline = time.monotonic() + (self.retry_s if retry else 0.0)
        delay = 0.2
        while True:
            wait: float | None
            try:
                response = self._client.request(
                    method, path, json=json, params=params, content=content, headers=headers
                )
            except httpx.TransportError as exc:
                failure = CaviarApiError(0, "unreachable", f"cannot reach {self.url}: {type(exc).__name__}")
                if isinstance(exc, httpx.UnsupportedProtocol) or (
                    not self._answered and isinstance(exc, httpx.ConnectError)
                ):
                    raise failure from exc  # not a URL, or nothing listens there (refused, no such host)
                wait = None
            else:
                self._answered = True
                if response.is_success:
                    return response
                failure = api_error(response)
                if response.status_code not in retry_on and failure.code not in ADMISSION_CODES:
                    raise failure
                wait = failure.retry_after_s = _retry_after(response)
            if wait is not None:  # the server's Retry-After, spread a little more (a burst retries apart)
                wait *= 1.0 + 0.25 * random.random()
            pause = min(wait if wait is not None else delay * (0.5 + random.random()), 30.0)
            if self._closed.is_set() or time.monotonic() + pause > deadline:
                raise failure
            _sleep(pause, self._closed)
            if self._closed.is_set():  # interrupted or closed while waiting: give up now
                raise failure
            delay = min(delay * 2, 10.0)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def pause(self, seconds: float) -> bool:
        """Wait about ``seconds`` (spread a little, as retries are; at most 30) between two tries of
        a caller's own loop; False when the client was interrupted or closed meanwhile (give up)."""
        _sleep(min(seconds * (1.0 + 0.25 * random.random()), 30.0), self._closed)
        return not self._closed.is_set()

    def interrupt(self) -> None:
        """Stop retrying: a request waiting between two tries gives up at once (a stopping worker
        does not wait out ``retry_s`` against a service that is down). Safe in a signal handler;
        the connections stay open, so a request that gets an answer still works."""
        self._closed.set()

    def close(self) -> None:
        """Stop retrying and release the connections."""
        self._closed.set()
        self._client.close()
