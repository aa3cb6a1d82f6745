"""``caviar.Client``: studies and trials of a caviar service, from any Python program.

Depends on httpx only (no torch, no FastAPI). The same :class:`Trial` serves a client loop
(``with study.ask() as trial``), ``study.optimize(objective)`` and programs run by a worker
(:func:`current_trial`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from caviar._errors import CaviarApiError, LeaseLost, TrialPruned
from caviar._http import RETRY_STATUSES, HttpClient
from caviar._http import api_path as _path

_log = logging.getLogger("caviar.client")

STOP_CODES = frozenset({"budget_exhausted", "study_failed", "study_paused", "study_stopped"})
"""Ask refusals that mean the study hands out no more trials (to this loop, for now)."""
TRIALS_PAGE = 1000
"""How many trials :meth:`Study.trials` reads per request (the API's largest page)."""


class Client:
    """A caviar service.

    Args:
        url: the service's base URL (default: ``CAVIAR_URL``, else ``http://127.0.0.1:8000``).
        token: bearer token (default: ``CAVIAR_API_TOKEN``).
        timeout_s: per-request timeout.
        retry_s: how long a request is retried through connection errors, 429 and 503.
        transport: an httpx transport (tests pass one).
        wait_for_service: retry also before the service first answered (False: report a service
            that is not there at once, as ``CaviarApiError`` with code ``unreachable``).
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
        self.http = HttpClient(
            url,
            token,
            timeout_s=timeout_s,
            retry_s=retry_s,
            transport=transport,
            wait_for_service=wait_for_service,
        )

    @property
    def url(self) -> str:
        return self.http.url

    def create_study(self, definition: dict[str, Any] | str | Path) -> Study:
        """Create a study from a definition (a mapping, or a YAML/JSON file path)."""
        if not isinstance(definition, dict):
            definition = _load_definition(Path(definition))
        created = self.http.post(_path("studies"), json=definition)
        study = Study(self, str(created["name"]))
        study.created = dict(created)
        return study

    def study(self, name: str) -> Study:
        """A handle on an existing study (no request is made)."""
        return Study(self, name)

    def _get(self, *parts: str | int, **params: Any) -> Any:
        """GET ``/api/v1/<parts>`` with the query parameters that are not None."""
        query = {k: v for k, v in params.items() if v is not None}
        return self.http.get(_path(*parts), params=query or None)

    # ---- what an operator's tools need (the ``caviar`` command line) ---------------------

    def list_studies(
        self, *, state: str | None = None, tags: Sequence[str] = (), limit: int = 100, queue: bool = False
    ) -> dict[str, Any]:
        """A page of studies, newest first: ``{items, total}``; ``tags`` are ``key`` or ``key=value``.

        With ``queue=True``: the queued and running studies in the order workers take them.
        """
        if queue:
            return dict(
                self._get("studies", state=["queued", "running"], tag=list(tags), limit=limit, order="queue")
            )
        return dict(self._get("studies", state=state, tag=list(tags), limit=limit))

    def workers(self) -> dict[str, Any]:
        """Registered workers with their device, current trials and last heartbeat: ``{items, total}``."""
        return dict(self._get("workers"))

    def create_schedule(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Create a schedule (name, cron, timezone, template, policies); returns it."""
        return dict(self.http.post(_path("schedules"), json=spec))

    def schedules(self, *, limit: int = 1000) -> dict[str, Any]:
        """Schedules: ``{items, total}``."""
        return dict(self._get("schedules", limit=limit))

    def schedule(self, ref: str) -> dict[str, Any]:
        """One schedule, by id or name."""
        return dict(self._get("schedules", ref))

    def update_schedule(self, ref: str, change: dict[str, Any]) -> dict[str, Any]:
        """Change a schedule (``{"enabled": false}``, timing, template, policies); returns it."""
        return dict(self.http.request("PATCH", _path("schedules", ref), json=change))

    def run_schedule(self, ref: str) -> dict[str, Any]:
        """Create the schedule's study now; returns the run."""
        return dict(self.http.post(_path("schedules", ref, "run")))

    def schedule_runs(self, ref: str, *, limit: int = 50) -> dict[str, Any]:
        """A schedule's runs, newest first: ``{items, total}``."""
        return dict(self._get("schedules", ref, "runs", limit=limit))

    def delete_schedule(self, ref: str) -> None:
        """Delete a schedule and its run history (its studies stay)."""
        self.http.request("DELETE", _path("schedules", ref))

    def create_token(self, scope: str, name: str | None = None) -> dict[str, Any]:
        """Create a token (admin scope needed); the answer holds its secret, shown only once."""
        body = {"scope": scope} | ({"name": name} if name else {})
        return dict(self.http.post(_path("tokens"), json=body))

    def tokens(self, *, include_revoked: bool = False) -> dict[str, Any]:
        """Tokens without their secrets: ``{items, total}``."""
        return dict(self._get("tokens", include_revoked=str(include_revoked).lower()))

    def revoke_token(self, token_id: int) -> None:
        """Revoke a token."""
        self.http.request("DELETE", _path("tokens", token_id))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _load_definition(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        # lazy: PyYAML is needed only for definition files
        from caviar._yaml import load

        data = load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected one study definition (a mapping)")
    return data


class Study:
    """One study of a caviar service."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self.created: dict[str, Any] | None = None
        """The service's answer when this handle created the study (with its warm-start summary)."""

    def __repr__(self) -> str:
        return f"Study({self.name!r})"

    def info(self) -> dict[str, Any]:
        """The study as the API shows it: state, definition, trial counts, best."""
        return dict(self.client.http.get(_path("studies", self.name)))

    def best(self) -> dict[str, Any]:
        """The best trial, or ``{"trials": [...]}`` (the Pareto front) for several objectives."""
        return dict(self.client.http.get(_path("studies", self.name, "best")))

    def trials(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every trial (optionally of one state), ordered by number."""
        items: list[dict[str, Any]] = []
        while True:
            params: dict[str, Any] = {"limit": TRIALS_PAGE, "offset": len(items)}
            if state:
                params["state"] = state
            page = self.client.http.get(_path("studies", self.name, "trials"), params=params)
            items += page["items"]
            if not page["items"] or len(items) >= page["total"]:
                return items

    def artifacts(self, number: int) -> list[dict[str, Any]]:
        """The files stored with trial ``number``: ``[{artifact_id, filename}]``."""
        return list(self.client.http.get(_path("studies", self.name, "trials", number, "artifacts")))

    def download(self, number: int, filename: str) -> bytes:
        """The newest file named ``filename`` stored with trial ``number`` (checkpoint.pt, trial.log)."""
        path = _path("studies", self.name, "trials", number, "artifacts", filename)
        return self.client.http.send("GET", path).content

    # ---- steering (the ``caviar study`` commands) ----------------------------------------

    def _act(self, *action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(self.client.http.post(_path("studies", self.name, *action), json=body))

    def update(self, change: dict[str, Any]) -> dict[str, Any]:
        """Edit the budget, priority or tags (a JSON merge patch); returns the study."""
        return dict(self.client.http.request("PATCH", _path("studies", self.name), json=change))

    def pause(self) -> dict[str, Any]:
        """Stop handing out trials (running ones go on); returns the study."""
        return self._act("pause")

    def resume(self) -> dict[str, Any]:
        """Hand out trials again after a pause; returns the study."""
        return self._act("resume")

    def stop(self, reason: str | None = None) -> dict[str, Any]:
        """End the study (waiting trials cancelled, running ones told to stop); returns it."""
        return self._act("stop", body={"reason": reason} if reason else None)

    def delete(self) -> None:
        """Delete the study, its trials and the files stored with them."""
        self.client.http.request("DELETE", _path("studies", self.name))

    def enqueue(self, trials: list[dict[str, Any]]) -> dict[str, Any]:
        """Enqueue ``[{params, value?}]`` (handed out first, or imported with a value): ``{items, total}``."""
        return self._act("trials", "enqueue", body={"trials": trials})

    def importances(self) -> dict[str, Any]:
        """``{"importances": {param: x}}`` (per metric for several objectives)."""
        return dict(self.client.http.get(_path("studies", self.name, "importances")))

    def refine(self, **options: Any) -> dict[str, Any]:
        """Create the coarse-to-fine follow-up study (``top_fraction``, ``min_top``, ...); returns it."""
        return self._act("refine", body=options)

    def export(self, fmt: str = "csv") -> str:
        """Every trial as ``csv`` (one ``params.<name>`` column per parameter) or ``json`` text."""
        path = _path("studies", self.name, "trials", "export")
        return self.client.http.send("GET", path, params={"format": fmt}).text

    def checkpoint(self, number: int | None = None) -> tuple[int, str, bytes]:
        """A trial's checkpoint (default: the best trial that stored one): ``(number, filename, content)``."""
        where = ("checkpoint",) if number is None else ("trials", number, "checkpoint")
        response = self.client.http.send("GET", _path("studies", self.name, *where))
        # attachment; filename="<study>-trial<n>-<file>": the trial it came from, then the file
        stored = response.headers.get("content-disposition", "").rpartition("filename=")[2].strip('"')
        trial, _, filename = stored.rpartition("-trial")[2].partition("-")
        return int(trial), filename or "checkpoint.pt", response.content

    def ask(
        self,
        *,
        worker_id: str | None = None,
        fixed: dict[str, Any] | None = None,
        wait: bool = True,
        heartbeat: bool = True,
    ) -> Trial:
        """Claim a trial (use as ``with study.ask() as trial:``).

        Args:
            worker_id: who runs the trial (default: a random id for this client).
            fixed: decoded parameter values the sampler must keep (it chooses the rest).
            wait: when the study runs ``max_parallel`` trials, wait for a free place (else raise).
            heartbeat: keep the lease from a background thread while the ``with`` block runs.

        Raises:
            CaviarApiError: ``budget_exhausted``, ``study_paused``, ``study_failed``, ...
        """
        body: dict[str, Any] = {"request_id": uuid.uuid4().hex, "worker_id": worker_id or _client_id()}
        if fixed:
            body["fixed"] = fixed
        retry_on = RETRY_STATUSES if wait else RETRY_STATUSES - {429}
        while True:
            try:
                data = self.client.http.post(
                    _path("studies", self.name, "trials", "ask"), json=body, retry_on=retry_on
                )
            except CaviarApiError as exc:
                # the HTTP layer's retry window ended while the study stayed full: wait as the
                # service asked (a window shorter than its Retry-After ends at once), then ask again
                if (
                    exc.code == "max_parallel_reached"
                    and wait
                    and self.client.http.pause(exc.retry_after_s or 1.0)
                ):
                    continue
                raise
            return Trial(self.client, data, worker_id=body["worker_id"], heartbeat=heartbeat)

    def optimize(
        self,
        objective: Callable[[Trial], float | Sequence[float]],
        n_trials: int | None = None,
        n_jobs: int = 1,
        *,
        catch: tuple[type[Exception], ...] = (),
    ) -> int:
        """Run ``objective(trial)`` on trials of this study until its global budget is used.

        The budget is the study's, shared with every other client and worker; ``n_trials`` caps
        how many this call runs. ``objective`` is an Optuna objective: it suggests its parameters,
        returns the value (or values), may call ``trial.report(value, step)`` and
        ``trial.should_prune()``, and may raise ``optuna.TrialPruned`` (or :class:`TrialPruned`),
        which ends the trial PRUNED.

        Args:
            objective: the function to tune.
            n_trials: at most this many trials in this call (default: until the study is done).
            n_jobs: threads running trials at once.
            catch: exception types that fail the trial and go on (others fail it and stop).

        Returns:
            The number of trials this call finished.
        """
        lock = threading.Lock()
        state = {"started": 0, "finished": 0, "stop": False}

        def worker() -> None:
            while True:
                with lock:
                    if state["stop"] or (n_trials is not None and state["started"] >= n_trials):
                        return
                    state["started"] += 1
                try:
                    trial = self.ask()
                except CaviarApiError as exc:
                    if exc.code in STOP_CODES:
                        with lock:
                            state["stop"] = True
                        return
                    raise
                try:
                    with trial:
                        result = objective(trial)
                        trial.tell(result)
                except LeaseLost:
                    _log.warning("trial %d of %s lost its lease; it is retried", trial.number, self.name)
                except catch as exc:
                    _log.warning("trial %d of %s failed: %r", trial.number, self.name, exc)
                with lock:
                    state["finished"] += 1

        if n_jobs <= 1:
            worker()
        else:
            with ThreadPoolExecutor(max_workers=n_jobs) as pool:
                for future in [pool.submit(worker) for _ in range(n_jobs)]:
                    future.result()
        return state["finished"]


_CLIENT_ID = f"client-{uuid.uuid4().hex[:12]}"


def _client_id() -> str:
    return _CLIENT_ID


class Trial:
    """A claimed trial: its parameters, and the calls that report on it and finish it.

    Speaks ``optuna.Trial``: ``suggest_float/int/categorical``, ``report(value, step)``,
    ``should_prune()``, ``set_user_attr``/``user_attrs``, ``params``, ``number``, ``distributions``;
    an unmodified Optuna objective runs with it.

    Attributes:
        study: the study's name.
        number: the trial's number in the study.
        params: the decoded parameters (``beta1``, not ``one_minus_beta1``): the declared ones the
            ask sampled, and every one suggested since.
        retry_of: the number of the failed trial this one retries, if any.
    """

    def __init__(
        self,
        client: Client,
        assignment: dict[str, Any],
        *,
        worker_id: str | None,
        heartbeat: bool = True,
        result_file: str | None = None,
    ) -> None:
        self.client = client
        self._result_file = result_file  # under a worker: the outcome goes to the worker, which tells
        self.study = str(assignment["study"])
        self.number = int(assignment["number"])
        self.params: dict[str, Any] = dict(assignment["params"])
        self.retry_of: int | None = assignment.get("retry_of")
        self.heartbeat_interval_s = float(assignment.get("heartbeat_interval_s", 30.0))
        self.credential: str | None = assignment.get("credential")
        """A token for this trial only (a worker hands it to the program it runs)."""
        self.worker_id = worker_id
        self._heartbeat = heartbeat
        self._finished = False
        self._lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prune = False
        self._suggested: dict[str, tuple[dict[str, Any], Any]] = {}
        self._user_attrs: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Trial(study={self.study!r}, number={self.number}, params={self.params})"

    @property
    def finished(self) -> bool:
        """Whether this trial was told (complete, pruned or failed) or handed back."""
        return self._finished

    def _post(self, action: str, body: dict[str, Any]) -> Any:
        if self._lost is not None:
            raise self._lost
        if self.worker_id is not None:
            body = {**body, "worker_id": self.worker_id}
        try:
            return self.client.http.post(
                _path("studies", self.study, "trials", self.number, action),
                json=body,
                headers=self._proof(),
            )
        except LeaseLost as exc:
            self._lost = exc
            raise

    def _proof(self) -> dict[str, str]:
        """The header that proves this client claimed the trial (a worker token alone does not)."""
        return {LEASE_HEADER: self.credential} if self.credential else {}

    # ---- Optuna's Trial interface: suggest, report, should_prune, user attributes -----------

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        """A float parameter, as ``optuna.Trial.suggest_float``.

        A parameter declared in the study's search space answers the value the service sampled at
        the ask (the call must match the declaration: range, step and log flag); an undeclared one
        is sampled now by the study's sampler (define-by-run over REST). The same name again answers
        the same value.

        Raises:
            CaviarApiError: ``suggest_mismatch`` (the call differs from the declaration; the message
                names both), ``distribution_mismatch`` (the name was suggested with another range),
                ``invalid_distribution``, ``reserved_name``.
        """
        attributes = {"low": float(low), "high": float(high), "step": None if step is None else float(step)}
        return float(self._suggest(name, "FloatDistribution", {**attributes, "log": bool(log)}))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        """An integer parameter, as ``optuna.Trial.suggest_int`` (see :meth:`suggest_float`)."""
        attributes = {
            "low": _integer(low, "low"),
            "high": _integer(high, "high"),
            "step": _integer(step, "step"),
        }
        return int(self._suggest(name, "IntDistribution", {**attributes, "log": bool(log)}))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        """One of ``choices`` (JSON scalars), as ``optuna.Trial.suggest_categorical`` (see
        :meth:`suggest_float`)."""
        return self._suggest(name, "CategoricalDistribution", {"choices": list(choices)})

    def _suggest(self, name: str, kind: str, attributes: dict[str, Any]) -> Any:
        distribution = {"name": kind, "attributes": attributes}
        known = self._suggested.get(name)
        if known is not None and known[0] == distribution:
            return known[1]
        value = self._post("suggest", {"name": name, "distribution": distribution})["value"]
        self._suggested[name] = (distribution, value)
        self.params[name] = value
        return value

    @property
    def distributions(self) -> dict[str, Any]:
        """The Optuna distributions of the parameters suggested so far (imports optuna)."""
        from optuna.distributions import json_to_distribution  # lazy: import caviar stays light

        return {name: json_to_distribution(json.dumps(d)) for name, (d, _) in self._suggested.items()}

    @property
    def user_attrs(self) -> dict[str, Any]:
        """User attributes set on this trial (stored with its outcome)."""
        return dict(self._user_attrs)

    def set_user_attr(self, key: str, value: Any) -> None:
        """Set a user attribute (a JSON scalar), as ``optuna.Trial.set_user_attr``; it is stored with
        the trial's outcome (complete, pruned or failed)."""
        if not isinstance(key, str) or key.startswith("caviar"):
            raise ValueError(f"set_user_attr: {key!r}: keys are strings not starting with 'caviar'")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise TypeError(
                f"set_user_attr: {key!r}: caviar stores a string, a number, true/false or null "
                f"(got {type(value).__name__}; json.dumps it for a structure)"
            )
        self._user_attrs[key] = value

    def report(self, value: float, step: int) -> None:
        """Report an intermediate value at ``step``, in Optuna's order (renews the lease).

        The pruner's decision is kept for :meth:`should_prune`; nothing is raised here (as in
        Optuna: an objective asks ``trial.should_prune()`` and raises ``optuna.TrialPruned``).

        Raises:
            TypeError: ``step`` is not an int, or ``value`` is an int: both are what a call in the
                reverse order, ``report(step, value)``, looks like.
        """
        _check_report(value, step)
        answer = self._post("report", {"step": int(step), "value": float(value)})
        self._answered(bool(answer["should_prune"]), int(step))

    def _answered(self, prune: bool, step: int, code: str | None = None, message: str = "") -> None:
        """Keep the service's answer to a report (``code``: why a batch could not record it)."""
        if code == "lease_lost":
            self._lost = LeaseLost(409, code, message)
        self._prune = prune or code is not None
        if self._prune and self._result_file is not None:
            # Under a worker: a program that lets TrialPruned escape (or exits non-zero) after this
            # decision ends PRUNED, not failed (the worker reads this mark).
            Path(f"{self._result_file}.pruned").write_text(str(step))

    def _can_report(self) -> bool:
        """Whether a report may still be sent (not told, lease not lost)."""
        return not self._finished and self._lost is None

    def should_prune(self) -> bool:
        """The pruner's decision for the last reported value (False before any report); True too
        when the study is stopping or the trial's lease is lost."""
        return self._prune

    def heartbeat(self) -> None:
        """Renew the lease now (the ``with`` block does this in the background)."""
        self._post("heartbeat", {})

    def upload(self, path: str | Path, *, filename: str | None = None) -> dict[str, Any]:
        """Store a file (checkpoint, log) with the trial; returns ``{artifact_id, filename}``."""
        path = Path(path)
        return dict(
            self.client.http.post(
                _path("studies", self.study, "trials", self.number, "artifacts"),
                params={"filename": filename or path.name},
                content=path.read_bytes(),
                headers={"Content-Type": "application/octet-stream", **self._proof()},
            )
        )

    # ---- finishing ---------------------------------------------------------------------

    def tell(
        self,
        value: float | Sequence[float] | None = None,
        *,
        values: Sequence[float] | None = None,
        user_attrs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Finish the trial as complete with its value (or values, for several objectives)."""
        if values is None:
            if value is None:
                raise ValueError("tell needs a value (or values)")
            values = list(value) if isinstance(value, Sequence) else [value]
        body: dict[str, Any] = {"state": "complete", "values": [float(v) for v in values]}
        return self._finish(body, user_attrs)

    def prune(self, *, user_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the trial as pruned."""
        return self._finish({"state": "pruned"}, user_attrs)

    def fail(
        self, reason: str = "", *, user_attrs: dict[str, Any] | None = None, fatal: bool = False
    ) -> dict[str, Any]:
        """Finish the trial as failed; the service retries it (same parameters) per ``max_retries``.

        ``fatal``: the failure is the study's, not this trial's (no retry; the study pauses with the
        reason), e.g. a program whose output cannot be read at all.
        """
        body: dict[str, Any] = {"state": "fail", "reason": reason[-2000:] or None}
        if fatal:
            body["fatal"] = True
        return self._finish(body, user_attrs)

    def release(self, reason: str = "handed back") -> None:
        """Hand the trial back unfinished: it is retried without using up a retry."""
        self._post("release", {"reason": reason[:2000]})
        self._finished = True

    def _finish(self, body: dict[str, Any], user_attrs: dict[str, Any] | None) -> dict[str, Any]:
        user_attrs = {**self._user_attrs, **(user_attrs or {})}
        if user_attrs:
            body["user_attrs"] = user_attrs
        if self._result_file is not None:
            # A worker runs this program: it tells the service once the program exits (after
            # storing its log), so the outcome is handed to it rather than sent from here.
            tmp = f"{self._result_file}.tmp"
            with open(tmp, "w") as handle:
                json.dump(body, handle)
            os.replace(tmp, self._result_file)
            self._finished = True
            return body
        told = dict(self._post("tell", body))
        self._finished = True
        return told

    # ---- the with block ----------------------------------------------------------------

    def __enter__(self) -> Trial:
        if self._heartbeat:
            self._thread = threading.Thread(
                target=self._beat, name=f"caviar-heartbeat-{self.number}", daemon=True
            )
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                self.heartbeat()
            except LeaseLost:
                return
            except CaviarApiError as exc:
                if exc.code == "trial_finished":
                    return
                if exc.code == "study_stopped":
                    continue  # the lease is kept: the next report raises TrialPruned, a tell still counts
                _log.warning("heartbeat of trial %d failed: %s", self.number, exc)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._finished or isinstance(exc, LeaseLost) or self._lost is not None:
            return False
        if exc is None:
            self.fail("the trial's block ended without a tell")
            raise RuntimeError(
                f"trial {self.number} of {self.study}: the with-block ended without trial.tell(value); "
                "it was told failed"
            )
        if is_pruned(exc):  # caviar.TrialPruned or optuna.TrialPruned
            self.prune()
            return True
        if isinstance(exc, Exception):
            self.fail(f"{type(exc).__name__}: {exc}")
        else:  # KeyboardInterrupt, SystemExit: not the trial's fault
            self.release(f"interrupted ({type(exc).__name__})")
        return False


def report_group(trials: Sequence[Trial], values: Sequence[float], step: int) -> list[bool]:
    """Report one step of several trials of one study in one request: a fused group's epoch.

    The same as ``trials[i].report(values[i], step)`` for each (in this order, each judged by the
    pruner as its own report would be), for one round trip instead of one per trial. Returns each
    trial's :meth:`Trial.should_prune`. A trial already told or whose lease is lost is not sent and
    answers True; a trial the service cannot record (its lease lost, not the caller's, ...)
    answers True, and the others are recorded.

    Raises:
        TypeError: as :meth:`Trial.report` (a step that is not an int, an int value).
        ValueError: ``values`` is not one per trial, or the trials are of several studies.
    """
    if len(values) != len(trials):
        raise ValueError(f"report_group: {len(values)} values for {len(trials)} trials")
    if len({trial.study for trial in trials}) > 1:
        raise ValueError("report_group: the trials of one call are of one study")
    for value in values:
        _check_report(value, step)
    live = [(trial, float(value)) for trial, value in zip(trials, values, strict=True) if trial._can_report()]
    for trial in trials:
        if not trial._can_report():
            trial._prune = True
    if live:
        sender = live[0][0]  # its client (and, under a worker, its own credential) sends the batch
        body = report_batch([(trial, int(step), value) for trial, value in live], sender.worker_id)
        try:
            answer = sender.client.http.post(_path("studies", sender.study, "trials", "reports"), json=body)
        except LeaseLost:  # the sender's own credential ended meanwhile: each reports on its own
            for trial, value in live:
                with contextlib.suppress(LeaseLost):
                    trial.report(value, step)
                trial._prune = trial._prune or trial._lost is not None
            return [trial.should_prune() for trial in trials]
        for (trial, _), result in zip(live, answer["results"], strict=True):
            trial._answered(
                bool(result["should_prune"]), int(step), result.get("code"), result.get("message") or ""
            )
    return [trial.should_prune() for trial in trials]


def report_batch(reports: Sequence[tuple[Trial, int, float]], worker_id: str | None) -> dict[str, Any]:
    """The body of ``POST .../trials/reports``: each ``(trial, step, value)`` with the trial's
    credential (the proof a worker token or another trial's credential must give)."""
    items = []
    for trial, step, value in reports:
        item: dict[str, Any] = {"number": trial.number, "step": int(step), "value": float(value)}
        if trial.credential:
            item["credential"] = trial.credential
        items.append(item)
    return {"reports": items} if worker_id is None else {"reports": items, "worker_id": worker_id}


def _check_report(value: float, step: int) -> None:
    """Refuse what a call in the old order, ``report(step, value)``, looks like."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(
            f"trial.report(value, step): step must be an int (got {step!r}); caviar takes Optuna's "
            "order, trial.report(value, step)"
        )
    if isinstance(value, numbers.Integral):
        raise TypeError(
            f"trial.report(value, step): value {value!r} is an int, as in the old order report(step, "
            "value); call trial.report(value, step), with float(value) if an int is really the value"
        )


LEASE_HEADER = "X-Caviar-Lease"
"""Sent with every call on a claimed trial: the ``credential`` its ask answered (tokens on)."""


def current_trial() -> Trial:
    """The trial a ``caviar worker`` runs this program for (``kind: python`` or ``command``).

    The worker heartbeats on the program's behalf; ``report``, ``tell`` and ``upload`` go to the
    service named by ``CAVIAR_URL`` with ``CAVIAR_API_TOKEN``.

    Raises:
        RuntimeError: outside a program started by a worker (no ``CAVIAR_TRIAL``).
    """
    raw = os.environ.get("CAVIAR_TRIAL")
    if not raw:
        raise RuntimeError(
            "caviar.current_trial(): not running under a caviar worker (CAVIAR_TRIAL is unset)"
        )
    global _current
    data = json.loads(raw)
    with _shared_lock:
        if _current is None or _current.number != data.get("number") or _current.study != data.get("study"):
            _current = Trial(
                _shared_client(),
                data,
                worker_id=data.get("worker_id"),
                heartbeat=False,
                result_file=data.get("result_file"),
            )
            _install_prune_hook()
        return _current


_current: Trial | None = None
_hooked = False


def _install_prune_hook() -> None:
    """Let ``TrialPruned`` (caviar's or Optuna's) escape a program: the trial ends PRUNED, not failed."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        trial = _current
        if trial is not None and is_pruned(exc) and not trial.finished:
            try:
                trial.prune()
            except Exception as error:  # the worker still reads the prune mark
                print(f"caviar: could not record trial {trial.number} as pruned: {error}", file=sys.stderr)
            print(f"caviar: trial {trial.number} pruned ({type(exc).__name__}: {exc})", file=sys.stderr)
            return
        previous(kind, exc, tb)

    sys.excepthook = hook


def is_pruned(exc: BaseException | None) -> bool:
    """Whether ``exc`` is ``caviar.TrialPruned`` or ``optuna.TrialPruned`` (without importing optuna)."""
    if exc is None:
        return False
    if isinstance(exc, TrialPruned):
        return True
    return any(
        cls.__name__ == "TrialPruned" and cls.__module__.split(".")[0] == "optuna"
        for cls in type(exc).__mro__
    )


def _integer(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"suggest_int: {field} must be an int (got {value!r})")
    return int(value)


_shared: Client | None = None
_shared_lock = threading.RLock()


def _shared_client() -> Client:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Client()
        return _shared
