"""caviar as an Optuna storage: Optuna's storage API over REST, with caviar's guarantees.

``caviar.optuna_storage(url, token)`` returns an :class:`optuna.storages.BaseStorage` (with Optuna's
heartbeat interface) for ``optuna.create_study/load_study(storage=...)``: Optuna code runs unchanged
from any host that has the service's URL and a token (no database password). A study created
through it is a caviar study; its budget is exact across every client, its running trials are
leased (a background thread heartbeats them; a client that dies has its trials failed and retried
with the same parameters by the service's reaper), and tokens and scopes apply (reads need read
scope, writes write scope).

Reads are cached as Optuna's own ``_CachedStorage`` caches an RDB storage (it wraps this module's
REST backend): finished trials are immutable, so each read fetches only the trials that are new or
still unfinished.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Container, Sequence
from types import FrameType
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from caviar import _optuna_wire as wire
from caviar._errors import CaviarApiError
from caviar._http import HttpClient, api_path

_log = logging.getLogger("caviar.optuna_storage")
STUDY_PAGE = 1000
"""Studies per request of ``get_all_studies``."""
MAX_INCLUDED_CHARS = 8_000
"""The longest list of unfinished trial ids one read sends (the service's bound)."""


class BudgetExhausted(CaviarApiError, optuna.exceptions.OptunaError):
    """A new trial was refused: the study has used its budget (``n_trials``) across all clients.

    A sequential ``study.optimize`` loop ends before this (each of its trials is started as the last
    one ends, and the storage stops the loop once the service says nothing is left); a thread of
    ``optimize(n_jobs>1)`` that loses the race for the last trial, or a client that starts after
    the budget is used, gets this from ``study.ask()``.
    """


def _translate(error: CaviarApiError) -> Exception:
    """Optuna's exception for a refusal of the service (see ``caviar.service.optuna_api``)."""
    code, message = error.code, error.message
    if code == "budget_exhausted":
        return BudgetExhausted(error.status, code, message, error.details)
    if code == "duplicated_study":
        return DuplicatedStudyError(message)
    if code == "update_finished_trial":
        return UpdateFinishedTrialError(message)
    if code == "optuna_runtime_error":
        return RuntimeError(message)
    if error.status == 404:
        return KeyError(message)
    if error.status == 422:
        return ValueError(message)
    return error


class _RestBackend(BaseStorage, BaseHeartbeat):
    """Optuna's storage API (with the private calls ``_CachedStorage`` makes of an RDB storage) over
    caviar's REST API. Use it through :class:`OptunaStorage`."""

    def __init__(self, http: HttpClient, client_id: str) -> None:
        self._http = http
        self._client_id = client_id
        self.on_budget: Callable[[int, int | None], None] = lambda study_id, left: None
        self.on_running: Callable[[int, bool], None] = lambda trial_id, running: None
        self.on_prefetched: Callable[[int, FrozenTrial], None] = lambda study_id, trial: None
        self.wants_prefetch: Callable[[], bool] = lambda: False
        self.heartbeat_interval_s = 30.0
        """The service's heartbeat interval, as its last answer about a running trial said."""

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return self._http.request(method, path, **kwargs)
        except CaviarApiError as exc:
            raise _translate(exc) from None

    # ---- studies -----------------------------------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        body = {"directions": [d.name for d in directions], "study_name": study_name}
        return int(self._call("POST", api_path("optuna", "studies"), json=body)["study_id"])

    def delete_study(self, study_id: int) -> None:
        self._call("DELETE", api_path("optuna", "studies", study_id))

    def _set_attr(self, path: str, kind: str, key: str, value: Any) -> None:
        self._call("POST", path, json={"kind": kind, "key": key, "value_json": json.dumps(value)})

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._set_attr(api_path("optuna", "studies", study_id, "attrs"), "user", key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._set_attr(api_path("optuna", "studies", study_id, "attrs"), "system", key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return int(
            self._call("GET", api_path("optuna", "study-ids"), params={"name": study_name})["study_id"]
        )

    def _study(self, study_id: int) -> FrozenStudy:
        return wire.study_in(self._call("GET", api_path("optuna", "studies", study_id)))

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._study(study_id).study_name

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return list(self._study(study_id).directions)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._study(study_id).user_attrs

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._study(study_id).system_attrs

    def get_all_studies(self) -> list[FrozenStudy]:
        studies: list[FrozenStudy] = []
        while True:
            params = {"limit": STUDY_PAGE, "offset": len(studies)}
            page = self._call("GET", api_path("optuna", "studies"), params=params)
            studies.extend(wire.study_in(s) for s in page)
            if len(page) < STUDY_PAGE:
                return studies

    # ---- trials ------------------------------------------------------------------------

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        body = {
            "template": wire.trial_out(template_trial) if template_trial is not None else None,
            "client_id": self._client_id,
        }
        try:
            answer = self._call("POST", api_path("optuna", "studies", study_id, "trials"), json=body)
        except BudgetExhausted:
            self.on_budget(study_id, 0)
            raise
        trial = wire.trial_in(answer["trial"])
        self.heartbeat_interval_s = float(answer["heartbeat_interval_s"])
        if trial.state == TrialState.RUNNING:
            self.on_running(trial._trial_id, True)
        self.on_budget(study_id, answer.get("budget_left"))
        return trial

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._create_new_trial(study_id, template_trial)._trial_id

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
        previous_distribution: BaseDistribution | None,
    ) -> None:
        body = {
            "name": param_name,
            "internal": wire.num_out(param_value_internal),
            "distribution": distribution_to_json(distribution),
            "previous_distribution": (
                distribution_to_json(previous_distribution) if previous_distribution is not None else None
            ),
        }
        self._call("POST", api_path("optuna", "trials", trial_id, "params"), json=body)

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        self._set_trial_param(trial_id, param_name, param_value_internal, distribution, None)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        path = api_path("optuna", "studies", study_id, "trial-ids", trial_number)
        return int(self._call("GET", path)["trial_id"])

    def _get_best_trial_id(self, study_id: int, direction: StudyDirection) -> int:
        return int(self._call("GET", api_path("optuna", "studies", study_id, "best-trial-id"))["trial_id"])

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        body = {
            "state": state.name,
            "values": wire.values_out(values),
            "client_id": self._client_id,
            "prefetch": state in (TrialState.COMPLETE, TrialState.PRUNED) and self.wants_prefetch(),
        }
        try:
            answer = self._call("POST", api_path("optuna", "trials", trial_id, "state"), json=body)
        except UpdateFinishedTrialError:
            self.on_running(trial_id, False)
            raise
        self.heartbeat_interval_s = float(answer["heartbeat_interval_s"])
        if state == TrialState.RUNNING and answer["updated"]:
            self.on_running(trial_id, True)
        elif state.is_finished():
            self.on_running(trial_id, False)
            study_id = int(answer["study_id"])
            if answer.get("next_trial") is not None:
                self.on_prefetched(study_id, wire.trial_in(answer["next_trial"]))
            else:
                self.on_budget(study_id, answer.get("budget_left"))
        return bool(answer["updated"])

    def release(self, trial_id: int) -> None:
        """Hand back a running trial this client will not run (it is re-queued as waiting)."""
        self._call("POST", api_path("optuna", "trials", trial_id, "release"))

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        body = {"step": step, "value": wire.num_out(intermediate_value)}
        self._call("POST", api_path("optuna", "trials", trial_id, "intermediate-values"), json=body)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(api_path("optuna", "trials", trial_id, "attrs"), "user", key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(api_path("optuna", "trials", trial_id, "attrs"), "system", key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return wire.trial_in(self._call("GET", api_path("optuna", "trials", trial_id)))

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        included = ",".join(str(i) for i in sorted(included_trial_ids))
        if len(included) > MAX_INCLUDED_CHARS:
            # too many unfinished trials for one URL: read everything after the oldest of them
            # instead (a superset: the cache takes the finished ones it already has again)
            trial_id_greater_than = min(trial_id_greater_than, min(included_trial_ids) - 1)
            included = ""
        params: dict[str, Any] = {"included": included, "greater_than": trial_id_greater_than}
        if states is not None:
            params["states"] = ",".join(s.name for s in TrialState if s in states)
        answer = self._call("GET", api_path("optuna", "studies", study_id, "trials"), params=params)
        return [wire.trial_in(t) for t in answer["trials"]]

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._get_trials(study_id, states, set(), -1)

    # ---- heartbeat (the service's reaper finds stale trials; see OptunaStorage) -----------

    def record_heartbeat(self, trial_id: int) -> None:
        self.heartbeat([trial_id])

    def heartbeat(self, trial_ids: Sequence[int]) -> list[int]:
        """Renew the leases of running trials; the ids whose lease is gone."""
        answer = self._call("POST", api_path("optuna", "heartbeats"), json={"trial_ids": list(trial_ids)})
        return [int(i) for i in answer["lost"]]

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return []

    def get_heartbeat_interval(self) -> int | None:
        return None

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return None


class OptunaStorage(_CachedStorage):
    """caviar as an Optuna storage (see :func:`optuna_storage`).

    Args:
        url: the service's base URL (default: ``CAVIAR_URL``, else ``http://127.0.0.1:8000``).
        token: a bearer token (default: ``CAVIAR_API_TOKEN``): read scope to read, write scope to
            create studies and run trials.
        retry_s: how long a request keeps retrying through outages (429, 502-504, no connection).
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, retry_s: float = 300.0) -> None:
        self._args = (url, token, retry_s)
        http = HttpClient(url, token, retry_s=retry_s)
        host = socket.gethostname()[:64]
        client_id = f"optuna:{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        backend = _RestBackend(http, client_id)
        super().__init__(backend)  # type: ignore[arg-type]  # the RDB calls _CachedStorage makes
        self._rest = backend
        self._running: set[int] = set()
        self._running_lock = threading.Lock()
        self._wake = threading.Event()
        self._beater: threading.Thread | None = None
        self._prefetched: dict[int, list[tuple[FrozenTrial, float]]] = {}
        backend.on_running = self._track
        backend.on_budget = self._budget
        backend.on_prefetched = self._keep_prefetched
        backend.wants_prefetch = optimize_goes_on
        atexit.register(_close, weakref.ref(self))

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self._args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        url, token, retry_s = state["args"]
        self.__init__(url, token, retry_s=retry_s)  # type: ignore[misc]

    # ---- prefetched trials: the next trial of an optimize loop, started as the last one ends --

    def _keep_prefetched(self, study_id: int, trial: FrozenTrial) -> None:
        with self._running_lock:
            self._prefetched.setdefault(study_id, []).append((trial, time.monotonic()))
        self._track(trial._trial_id, True)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """Optuna's ``create_new_trial``; an optimize loop's next trial is the one the service
        started for it when its last trial ended (see :func:`optimize_goes_on`), if any."""
        if template_trial is None:
            with self._running_lock:
                waiting = self._prefetched.get(study_id)
                trial = waiting.pop(0)[0] if waiting else None
            if trial is not None:
                with self._lock:
                    if study_id not in self._studies:
                        self._studies[study_id] = _StudyInfo()
                    self._add_trials_to_cache(study_id, [trial])
                return trial._trial_id
        return super().create_new_trial(study_id, template_trial)

    def _release_unclaimed(self, older_than_s: float) -> None:
        """Hand back prefetched trials no loop took (it stopped: a callback, a timeout)."""
        now = time.monotonic()
        with self._running_lock:
            stale = [t for kept in self._prefetched.values() for t, at in kept if now - at >= older_than_s]
            for study_id, kept in self._prefetched.items():
                self._prefetched[study_id] = [(t, at) for t, at in kept if now - at < older_than_s]
        for trial in stale:
            self._track(trial._trial_id, False)
            try:
                self._rest.release(trial._trial_id)
            except Exception as exc:  # its lease lapses instead, and the reaper re-queues it
                _log.warning("could not hand back trial %s: %s", trial.number, exc)

    def close(self) -> None:
        """Hand back every prefetched trial no loop took (also run at interpreter exit)."""
        self._release_unclaimed(0.0)

    # ---- leases: one background thread heartbeats every trial this storage runs -----------

    def _track(self, trial_id: int, running: bool) -> None:
        with self._running_lock:
            if running:
                self._running.add(trial_id)
                if self._beater is None or not self._beater.is_alive():
                    self._beater = threading.Thread(
                        target=self._beat, name="caviar-optuna-heartbeat", daemon=True
                    )
                    self._beater.start()
            else:
                self._running.discard(trial_id)

    def _beat(self) -> None:
        while True:
            self._wake.wait(self._rest.heartbeat_interval_s)
            self._release_unclaimed(self._rest.heartbeat_interval_s)
            with self._running_lock:
                trial_ids = sorted(self._running)
                if not trial_ids:
                    self._beater = None
                    return
            try:
                lost = self._rest.heartbeat(trial_ids)
            except Exception as exc:  # the next beat tries again; the lease lasts two intervals
                _log.warning("heartbeat failed: %s", exc)
                continue
            if lost:
                with self._running_lock:  # a trial told meanwhile has left the set: not a loss
                    lost = [trial_id for trial_id in lost if trial_id in self._running]
                    self._running.difference_update(lost)
                if lost:
                    _log.warning("trials %s lost their lease (reaped: their retries run instead)", lost)

    def record_heartbeat(self, trial_id: int) -> None:
        """Renew the lease of a running trial (the background thread does it for every trial this
        storage created or started; call it only to renew sooner)."""
        lost = self._rest.heartbeat([trial_id])
        if lost:
            self._track(trial_id, False)

    def get_heartbeat_interval(self) -> int | None:
        """None: Optuna's own per-trial heartbeat thread and its stale-trial sweep stay off (and
        ``study.ask()`` does not warn); caviar heartbeats every running trial of this storage in
        one background thread, and the service's reaper fails and retries stale trials."""
        return None

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return []

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return None

    def running_trial_ids(self) -> list[int]:
        """The trials this storage holds leases of."""
        with self._running_lock:
            return sorted(self._running)

    # ---- budget: optimize ends when the service says the budget is used -------------------

    def _budget(self, study_id: int, left: int | None) -> None:
        with self._running_lock:
            holding = bool(self._prefetched.get(study_id))
        if left is not None and left <= 0 and not holding:  # a trial it holds still runs here
            stop_optimize(study_id)


def _close(ref: weakref.ref[OptunaStorage]) -> None:
    storage = ref()
    if storage is not None:
        storage.close()


def optimize_goes_on() -> bool:
    """Whether the ``study.optimize`` loop making this call will start another trial.

    True inside a sequential loop (``n_jobs=1``) that is not stopped and has trials left of its own
    ``n_trials``. False with ``n_jobs > 1``: there each trial runs as a loop of its own that the
    thread pool submits, and the pool may start more of them than trials were started for it.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return False
        if frame.f_code.co_name == "_optimize_sequential" and frame.f_globals.get("__name__") == (
            "optuna.study._optimize"
        ):
            local = frame.f_locals
            study = local.get("study")
            if not isinstance(study, optuna.Study) or study._stop_flag:
                return False
            if local.get("reseed_sampler_rng"):  # n_jobs > 1
                return False
            n_trials, done = local.get("n_trials"), local.get("i_trial", 0)
            return n_trials is None or done < n_trials
        frame = frame.f_back
    return False


def stop_optimize(study_id: int) -> bool:
    """Stop the ``study.optimize`` loop that is making this storage call, as ``study.stop()`` does.

    Optuna checks its stop flag before each new trial (``study.stop()`` is the documented way for a
    callback or an objective to end ``optimize``); a storage call cannot reach the study otherwise,
    so this looks for it among its callers (``Study.ask`` or Optuna's tell, a few frames up).

    Returns:
        Whether a running optimize loop of that study was found and stopped.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return False
        for name in ("self", "study"):
            candidate = frame.f_locals.get(name)
            if (
                isinstance(candidate, optuna.Study)
                and candidate._study_id == study_id
                and getattr(candidate._thread_local, "in_optimize_loop", False)
            ):
                candidate.stop()
                return True
        frame = frame.f_back
    return False


def optuna_storage(url: str | None = None, token: str | None = None) -> OptunaStorage:
    """caviar as an Optuna storage, over REST: ``optuna.create_study(storage=caviar.optuna_storage())``.

    Args:
        url: the service's base URL (default: ``CAVIAR_URL``, else ``http://127.0.0.1:8000``).
        token: a bearer token (default: ``CAVIAR_API_TOKEN``).

    Returns:
        An ``optuna.storages.BaseStorage`` with Optuna's heartbeat interface.
    """
    return OptunaStorage(url, token)
