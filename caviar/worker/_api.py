"""The worker's one face onto the service: the REST calls a worker slot makes, nothing else.

A worker needs only a URL and a ``worker``-scope token: no database URL or credentials.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from caviar._client import Client, Trial, report_batch
from caviar._errors import CaviarApiError
from caviar._http import api_path as _path

NO_TRIAL_CODES = frozenset(
    {
        "budget_exhausted",
        "study_paused",
        "study_failed",
        "study_stopped",
        "max_parallel_reached",
        "study_not_found",
    }
)
"""Ask refusals that mean "nothing to run in this study now": the worker moves on."""


PERMANENT_STATUSES = frozenset({401, 403})
"""Answers no retry can change: a bad or revoked token, a missing scope."""

EXIT_PERMANENT = 78
"""A slot's exit status for a permanent error (EX_CONFIG): the supervisor stops, not restarts."""


def is_permanent(exc: CaviarApiError) -> bool:
    """True for a refusal that waiting cannot fix (the worker should end, not back off)."""
    return exc.status in PERMANENT_STATUSES


def one_line(exc: CaviarApiError) -> str:
    """The sentence a person reads for a permanent refusal, with what to do about it."""
    if exc.status == 401:
        return f"{exc.message}: check --token / CAVIAR_API_TOKEN (a worker-scope token of this service)"
    return f"{exc.message}: the token needs the worker scope (caviar token create --scope worker)"


class Stopped(Exception):
    """Raised inside a running trial when its slot was asked to stop."""


class WorkerApi:
    """The service as one worker slot sees it.

    Args:
        client: the service.
        worker_id: this slot's id (trials it asks for are bound to it).
    """

    def __init__(self, client: Client, worker_id: str) -> None:
        self.client = client
        self.http = client.http
        self.worker_id = worker_id
        self.credential: str | None = None
        """What the registration answered (with tokens on): every heartbeat of this id sends it."""

    def check_access(self) -> None:
        """Ask what this token may do, so a bad token ends the worker before any slot starts.

        Raises:
            CaviarApiError: the service refused the token (401), the token lacks the worker scope
                (403, raised here), or the service stayed unreachable.
        """
        answer = self.http.get(_path("whoami"))
        if "worker" not in answer["scopes"]:
            message = f"a {answer['scope']} token cannot run trials: it needs worker scope"
            raise CaviarApiError(403, "forbidden", message)

    def register(self, *, host: str, pid: int, device: str) -> float:
        """Announce this slot; returns the service's heartbeat interval.

        The answer's ``credential`` (with tokens on) is kept: it proves, with every heartbeat,
        that this slot is the one that registered its id.
        """
        body = {"id": self.worker_id, "host": host, "pid": pid, "device": device}
        answer = self.http.post(_path("workers"), json=body)
        self.credential = answer.get("credential")
        return float(answer["heartbeat_interval_s"])

    def beat(self, held: Iterable[tuple[str, int, str | None]], *, status: str) -> list[tuple[str, int, str]]:
        """Renew every held lease in one call; returns the trials to stop, with why.

        Args:
            held: (study, number, credential) of each held trial: the credential its ask answered
                proves the claim (None on a service without tokens).
        """
        trials = [{"study": s, "number": n, **({"credential": c} if c else {})} for s, n, c in held]
        body: dict[str, Any] = {"status": status, "trials": trials}
        if self.credential:
            body["credential"] = self.credential
        answer = self.http.post(_path("workers", self.worker_id, "heartbeat"), json=body)
        return [(item["study"], int(item["number"]), str(item["code"])) for item in answer["lost"]]

    def report_many(
        self, study: str, reports: Sequence[tuple[Trial, int, float]]
    ) -> list[tuple[bool, str | None]]:
        """Report intermediate values of several trials of ``study`` in one call, recorded in order.

        Returns:
            Per report, in order: whether its trial must stop, and the error code when the service
            could not record it (``lease_lost``, ``not_your_trial``, ...; the trial must stop too).
        """
        body = report_batch(reports, self.worker_id)
        answer = self.http.post(_path("studies", study, "trials", "reports"), json=body)
        return [(bool(item["should_prune"]), item.get("code")) for item in answer["results"]]

    def queue(self, *, kinds: Sequence[str], studies: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Runnable studies of these objective kinds, in the order workers take them."""
        params = [("kind", kind) for kind in kinds] + ([("study", ",".join(studies))] if studies else [])
        return list(self.http.get(_path("queue"), params=params)["items"])

    def ask(self, study: str, *, fixed: dict[str, Any] | None = None) -> Trial | None:
        """Claim a trial of ``study``; None when it has nothing to hand out now."""
        try:
            return self.client.study(study).ask(
                worker_id=self.worker_id, fixed=fixed, wait=False, heartbeat=False
            )
        except CaviarApiError as exc:
            if exc.code in NO_TRIAL_CODES:
                return None
            raise
