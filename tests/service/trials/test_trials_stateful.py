"""A model-based test of the trial lifecycle over the REST API.

A Hypothesis state machine drives one study through asks (with and without ``request_id`` and
``worker_id``), reports, heartbeats, tells of every kind, hand-backs, lease expiry through the
reaper on a controlled clock, pause/resume, budget edits (``n_trials`` up and down,
``max_parallel``, ``max_failed_trials``) and stop, and compares every answer with a small
reference model written here from the contract (DESIGN.md, "Semantics users rely on"). After
every step it checks the invariants the contract promises: the budget is exact, no trial is both
finished and retried, retries keep their parameters and count their attempts, hand-backs keep
their retry and are not failures, and the study's counts match its trials.

Examples per run: ``CAVIAR_STATEFUL_EXAMPLES`` (default 15, well under a minute on SQLite), steps
per example ``CAVIAR_STATEFUL_STEPS`` (40); ``make test-long`` runs many more. A failure prints
the steps that led to it and a ``@reproduce_failure`` blob; ``CAVIAR_STATEFUL_SHRINK=1`` shrinks
it to a minimal sequence (minutes). ``CAVIAR_STATEFUL_VERBOSE=1`` (with ``-s``) prints what a
run reached (error codes, study states, reaps, retries).
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from caviar.service.db import Database
from caviar.service.store import ATTEMPT, CANCELLED, RELEASED, RETRY_OF
from caviar.service.store import _leases as store_leases
from caviar.service.trials import leases, lifecycle
from caviar.storage import utcnow
from tests.service.helpers import external_study

API = "/api/v1/studies"
HEARTBEAT_S = 30.0
LEASE_S = 2 * HEARTBEAT_S
EXAMPLES = int(os.environ.get("CAVIAR_STATEFUL_EXAMPLES", "15"))
STEPS = int(os.environ.get("CAVIAR_STATEFUL_STEPS", "40"))
# Shrinking a failure replays hundreds of API sequences (minutes): off unless asked for.
SHRINK = os.environ.get("CAVIAR_STATEFUL_SHRINK", "") not in ("", "0")
# Clock steps whose sums never land exactly on a lease's length (60 s): no ties at expiry.
CLOCK_STEPS_S = (17, 29, 61)
DEATH_STEP_S = 32  # twice this outlasts a lease; once this after a heartbeat does not
VALUES = (0.0, 0.5, 1.0)  # few values, so repeated tells sometimes repeat the value


class Clock:
    """The time the trial domain sees (``utcnow`` of the lease and lifecycle modules)."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@dataclass
class Trial:
    """The model of one trial."""

    number: int
    state: str  # waiting | running | complete | pruned | fail
    retry_of: int | None = None
    attempt: int = 0
    params: dict[str, Any] | None = None
    lease: str | None = None  # None (never asked) | active | finished | reaped | released
    expires: datetime | None = None
    worker: str | None = None
    value: float | None = None
    steps: dict[int, float] = field(default_factory=dict)
    ended_by: str | None = None  # how a failed trial failed: told | reaped | released | cancelled

    @property
    def finished(self) -> bool:
        return self.state in ("complete", "pruned", "fail")


_names = itertools.count()
SEEN: Counter[str] = Counter()


class TrialLifecycle(RuleBasedStateMachine):
    """One study per example, on the app and database the test hands over in class attributes."""

    client: TestClient
    db: Database
    clock: Clock

    def __init__(self) -> None:
        super().__init__()
        self.name = f"model-{os.getpid()}-{next(_names)}"
        self.trials: list[Trial] = []
        self.pending: list[Trial] = []  # retries made by the last step whose number is not known yet
        self.requests: dict[str, int] = {}
        self.request_ids = itertools.count()
        self.state = "queued"
        self.started = False

    # ---- the model's own rules (from the contract) --------------------------------------

    def count(self, *states: str) -> int:
        return sum(1 for t in self.trials if t.state in states)

    @property
    def used(self) -> int:
        return self.count("complete", "pruned", "running", "waiting")

    def failures(self) -> int:
        """Failures that count against max_failed_trials (not hand-backs, not cancelled trials)."""
        return sum(1 for t in self.trials if t.state == "fail" and t.ended_by in ("told", "reaped"))

    def retry(self, trial: Trial, *, handed_back: bool) -> None:
        """Re-queue a failed trial while it has retries left (a hand-back keeps its attempt)."""
        attempt = trial.attempt if handed_back else trial.attempt + 1
        if attempt > self.max_retries or self.state in ("stopping", "stopped"):
            return
        SEEN["retry-handed-back" if handed_back else "retry"] += 1
        retry = Trial(-1, "waiting", retry_of=trial.number, attempt=attempt, params=trial.params)
        self.pending.append(retry)

    def settle(self) -> None:
        """The study moves on when its trials say so (after a tell, hand-back, reap, edit, resume)."""
        if self.state in ("completed", "failed", "stopped"):
            return
        if self.state == "stopping":
            if self.count("running") == 0:
                self.cancel_waiting()
                self.state = "stopped"
            return
        if self.failures() > self.max_failed:
            self.state = "failed"
        elif (
            self.state in ("queued", "running")
            and self.count("complete", "pruned") >= self.n_trials
            and self.count("running", "waiting") == 0
        ):
            self.state = "completed"

    def cancel_waiting(self) -> None:
        for trial in self.trials:
            if trial.state == "waiting":
                trial.state, trial.ended_by = "fail", "cancelled"

    def adopt_pending(self) -> None:
        """Give the retries of the last step their numbers (several reaped at once are re-queued in
        the database's order, so the model takes their numbers from the answer, by ``retry_of``)."""
        if not self.pending:
            return
        listed = self.list_trials()
        by_parent = {t["retry_of"]: t["number"] for t in listed if t["retry_of"] is not None}
        numbers = set()
        for retry in self.pending:
            assert retry.retry_of in by_parent, f"no retry of trial {retry.retry_of}: {listed}"
            retry.number = by_parent[retry.retry_of]
            numbers.add(retry.number)
        assert numbers == set(range(len(self.trials), len(self.trials) + len(self.pending))), numbers
        self.trials.extend(sorted(self.pending, key=lambda t: t.number))
        self.pending = []

    # ---- HTTP helpers --------------------------------------------------------------------

    def post(self, path: str, body: dict[str, Any] | None = None) -> Response:
        return self.client.post(f"{API}/{self.name}{path}", json=body)

    def list_trials(self) -> list[dict[str, Any]]:
        response = self.client.get(f"{API}/{self.name}/trials", params={"limit": 1000})
        assert response.status_code == 200, response.text
        return list(response.json()["items"])

    def expect_error(self, response: Response, status: int, code: str) -> None:
        SEEN[code] += 1
        assert response.status_code == status, (status, code, response.status_code, response.text)
        assert response.json()["error"]["code"] == code, (code, response.text)

    def pick(self, index: int, running_only: bool) -> Trial:
        pool = [t for t in self.trials if t.state == "running"] if running_only else []
        pool = pool or self.trials
        return pool[index % len(pool)]

    # ---- rules -----------------------------------------------------------------------------

    @initialize(
        n_trials=st.integers(1, 6),
        max_retries=st.sampled_from([0, 1, 1, 2]),
        max_failed=st.sampled_from([0, 1, 3, 6]),
        max_parallel=st.one_of(st.none(), st.integers(1, 3)),
        first_asks=st.integers(0, 3),
    )
    def create(
        self, n_trials: int, max_retries: int, max_failed: int, max_parallel: int | None, first_asks: int
    ) -> None:
        self.n_trials, self.max_retries, self.max_failed = n_trials, max_retries, max_failed
        self.max_parallel = max_parallel
        body = external_study(
            self.name,
            n_trials=n_trials,
            max_retries=max_retries,
            max_failed_trials=max_failed,
            max_parallel=max_parallel,
        )
        response = self.client.post(API, json=body)
        assert response.status_code == 201, response.text
        for _ in range(first_asks):  # most examples start with trials running
            self._ask("w1", None, 0)

    @rule(worker=st.sampled_from([None, "w1", "w2"]), request=st.sampled_from([None, "new"]))
    def ask(self, worker: str | None, request: str | None) -> None:
        self._ask(worker, request, 0)

    @rule(
        worker=st.sampled_from([None, "w1", "w2"]),
        request=st.sampled_from([None, "new", "again"]),
        which=st.integers(0, 50),
    )
    def ask_again(self, worker: str | None, request: str | None, which: int) -> None:
        """Another ask (asks are the commonest call), sometimes repeating an earlier request_id."""
        self._ask(worker, request, which)

    def _ask(self, worker: str | None, request: str | None, which: int) -> None:
        request_id = None
        if request == "again" and self.requests:
            request_id = sorted(self.requests)[which % len(self.requests)]
        elif request is not None:
            request_id = f"req-{next(self.request_ids)}"
        body: dict[str, Any] = {}
        if worker is not None:
            body["worker_id"] = worker
        if request_id is not None:
            body["request_id"] = request_id
        response = self.post("/trials/ask", body)
        if request_id in self.requests:  # a replay: the same trial, whatever happened since
            assert response.status_code == 200, response.text
            earlier = self.trials[self.requests[request_id]]
            assert response.json()["number"] == earlier.number
            assert response.json()["params"] == earlier.params
            return
        waiting = [t for t in self.trials if t.state == "waiting"]
        if self.state == "paused":
            return self.expect_error(response, 409, "study_paused")
        if self.state in ("stopping", "stopped"):
            return self.expect_error(response, 409, "study_stopped")
        if self.state == "failed":
            return self.expect_error(response, 409, "study_failed")
        if not waiting and (self.state == "completed" or self.used >= self.n_trials):
            return self.expect_error(response, 409, "budget_exhausted")
        if self.max_parallel is not None and self.count("running") >= self.max_parallel:
            return self.expect_error(response, 429, "max_parallel_reached")
        assert response.status_code == 200, response.text
        answer = response.json()
        if waiting:  # a waiting trial (a retry) goes first, with its parameters
            trial = min(waiting, key=lambda t: t.number)
            assert answer["number"] == trial.number
            assert answer["params"] == trial.params
            assert answer["retry_of"] == trial.retry_of
        else:
            assert answer["number"] == len(self.trials)
            assert answer["retry_of"] is None
            trial = Trial(len(self.trials), "waiting", params=answer["params"])
            self.trials.append(trial)
        trial.state, trial.lease, trial.worker = "running", "active", worker
        trial.expires = self.clock.now + timedelta(seconds=LEASE_S)
        if request_id is not None:
            self.requests[request_id] = trial.number
        if self.state == "queued":
            self.state = "running"
        self.started = True

    def _unusable(self, trial: Trial) -> tuple[int, str] | None:
        """Why a trial takes no report, heartbeat or tell: lease_lost before trial_finished."""
        if trial.lease in ("reaped", "released"):
            return 409, "lease_lost"
        if trial.finished:
            return 409, "trial_finished"
        if trial.state != "running":
            return 409, "trial_not_running"
        return None

    @rule(
        which=st.integers(0, 50),
        running_only=st.booleans(),
        step=st.integers(0, 3),
        value=st.sampled_from(VALUES),
    )
    @precondition(lambda self: bool(self.trials))
    def report(self, which: int, running_only: bool, step: int, value: float) -> None:
        trial = self.pick(which, running_only)
        response = self.post(f"/trials/{trial.number}/report", {"step": step, "value": value})
        refusal = self._unusable(trial)
        if refusal is not None:
            return self.expect_error(response, *refusal)
        assert response.status_code == 200, response.text
        assert response.json()["should_prune"] == (self.state in ("stopping", "stopped"))
        trial.steps[step] = value
        if trial.expires is None or trial.expires <= self.clock.now + timedelta(seconds=HEARTBEAT_S):
            trial.expires = self.clock.now + timedelta(seconds=LEASE_S)  # past half its lease: renewed

    @rule(which=st.integers(0, 50), running_only=st.booleans())
    @precondition(lambda self: bool(self.trials))
    def heartbeat(self, which: int, running_only: bool) -> None:
        self._heartbeat(self.pick(which, running_only))

    def _heartbeat(self, trial: Trial) -> None:
        response = self.post(f"/trials/{trial.number}/heartbeat", {})
        if trial.lease == "active":  # renewed (even when it lapsed, until the reaper comes)
            trial.expires = self.clock.now + timedelta(seconds=LEASE_S)
            if self.state in ("stopping", "stopped"):
                return self.expect_error(response, 409, "study_stopped")
            assert response.status_code == 204, response.text
            return
        refusal = self._unusable(trial)
        assert refusal is not None
        self.expect_error(response, *refusal)

    @rule(
        which=st.integers(0, 50),
        running_only=st.booleans(),
        kind=st.sampled_from(["complete", "pruned", "fail"]),
        value=st.sampled_from(VALUES),
    )
    @precondition(lambda self: bool(self.trials))
    def tell(self, which: int, running_only: bool, kind: str, value: float) -> None:
        trial = self.pick(which, running_only)
        body: dict[str, Any] = {"state": kind}
        if kind == "complete":
            body["value"] = value
        if kind == "fail":
            body["reason"] = "boom"
        response = self.post(f"/trials/{trial.number}/tell", body)
        if trial.finished:
            if trial.lease in ("reaped", "released"):
                return self.expect_error(response, 409, "lease_lost")
            if trial.state == kind and (kind != "complete" or trial.value == value):
                assert response.status_code == 200, response.text  # the same tell again
                assert response.json()["state"] == kind
                return
            return self.expect_error(response, 409, "trial_finished")
        if trial.state != "running":
            return self.expect_error(response, 409, "trial_not_running")
        assert response.status_code == 200, response.text
        assert response.json()["state"] == kind
        trial.state, trial.lease = kind, "finished"
        if kind == "complete":
            trial.value = value
        elif kind == "pruned":  # Optuna gives a pruned trial its last intermediate value
            trial.value = trial.steps[max(trial.steps)] if trial.steps else None
        else:
            trial.ended_by = "told"
            self.retry(trial, handed_back=False)
        self.adopt_pending()
        self.settle()

    @rule(which=st.integers(0, 50), running_only=st.booleans())
    @precondition(lambda self: any(t.state == "running" for t in self.trials))
    def release(self, which: int, running_only: bool) -> None:
        trial = self.pick(which, running_only)
        response = self.post(f"/trials/{trial.number}/release", {})
        assert response.status_code == 200, response.text
        if trial.state != "running":
            return  # a hand-back of a trial that does not run changes nothing
        trial.state, trial.lease, trial.ended_by = "fail", "released", "released"
        self.retry(trial, handed_back=True)
        self.adopt_pending()
        self.settle()

    @rule(seconds=st.sampled_from(CLOCK_STEPS_S))
    def reap(self, seconds: int) -> None:
        """Time passes; the reaper fails and retries every trial whose lease lapsed."""
        self._reap(self.clock.advance(seconds))

    @rule(which=st.integers(0, 50))
    @precondition(lambda self: any(t.state == "running" for t in self.trials))
    def worker_dies(self, which: int) -> None:
        """One running trial's worker dies: the others heartbeat, and its lease alone lapses."""
        self.clock.advance(DEATH_STEP_S)
        dead = self.pick(which, running_only=True)
        for trial in self.trials:
            if trial.state == "running" and trial is not dead:
                self._heartbeat(trial)
        self._reap(self.clock.advance(DEATH_STEP_S))
        assert dead.lease == "reaped"

    def _reap(self, now: datetime) -> None:
        leases.reap(self.db, now=now)
        due = [t for t in self.trials if t.lease == "active" and t.expires is not None and t.expires < now]
        for trial in due:
            trial.state, trial.lease, trial.ended_by = "fail", "reaped", "reaped"
            SEEN["reaped"] += 1
            self.retry(trial, handed_back=False)
        self.adopt_pending()
        if due:
            self.settle()

    @precondition(lambda self: self.state != "paused")
    @rule()
    def pause(self) -> None:
        response = self.client.post(f"{API}/{self.name}/pause")
        if self.state not in ("queued", "running"):
            return self.expect_error(response, 409, "invalid_state")
        assert response.status_code == 200, response.text
        self.state = "paused"

    @precondition(lambda self: self.state not in ("queued", "running"))
    @rule()
    def resume(self) -> None:
        response = self.client.post(f"{API}/{self.name}/resume")
        if self.state != "paused":
            return self.expect_error(response, 409, "invalid_state")
        assert response.status_code == 200, response.text
        self.state = "running" if self.started else "queued"
        self.settle()

    @precondition(lambda self: len(self.trials) >= 2)
    @rule(now=st.integers(0, 2))
    def stop(self, now: int) -> None:
        """Stop the study (one draw in three: a stop ends everything else an example could do)."""
        if now:
            return
        response = self.client.post(f"{API}/{self.name}/stop", json={})
        if self.state in ("completed", "failed", "stopped"):
            return self.expect_error(response, 409, "invalid_state")
        assert response.status_code == 200, response.text
        self.state = "stopping"
        self.cancel_waiting()
        if self.count("running") == 0:
            self.state = "stopped"

    @rule(
        n_delta=st.one_of(st.none(), st.integers(-3, 3)),
        max_parallel=st.sampled_from(["keep", None, 1, 2, 3]),
        max_failed=st.one_of(st.none(), st.integers(0, 4)),
    )
    def edit_budget(self, n_delta: int | None, max_parallel: Any, max_failed: int | None) -> None:
        budget: dict[str, Any] = {}
        if n_delta is not None:
            budget["n_trials"] = max(1, self.n_trials + n_delta)
        if max_parallel != "keep":
            budget["max_parallel"] = max_parallel
        if max_failed is not None:
            budget["max_failed_trials"] = max_failed
        if not budget:
            return
        response = self.client.patch(f"{API}/{self.name}", json={"budget": budget})
        if self.state in ("stopping", "stopped"):
            return self.expect_error(response, 409, "study_stopped")
        if budget.get("n_trials", self.n_trials) < self.used:
            return self.expect_error(response, 409, "budget_below_used")
        assert response.status_code == 200, response.text
        self.n_trials = budget.get("n_trials", self.n_trials)
        self.max_parallel = budget.get("max_parallel", self.max_parallel)
        self.max_failed = budget.get("max_failed_trials", self.max_failed)
        if self.state == "completed" and self.n_trials > self.count("complete", "pruned"):
            self.state = "running" if self.started else "queued"
        if self.state == "failed" and self.failures() <= self.max_failed:
            self.state = "running" if self.started else "queued"
        self.settle()

    # ---- invariants ------------------------------------------------------------------------

    @invariant()
    def matches_the_model_and_keeps_the_contract(self) -> None:
        if not hasattr(self, "n_trials"):
            return
        study = self.client.get(f"{API}/{self.name}")
        assert study.status_code == 200, study.text
        study_json = study.json()
        SEEN["state:" + study_json["state"]] += 1
        listed = self.list_trials()
        by_number = {t["number"]: t for t in listed}
        # the study and its counts
        assert study_json["state"] == self.state, (study_json["state"], self.state, self.trials)
        counts = Counter(t["state"] for t in listed)
        for state in ("waiting", "running", "complete", "pruned", "fail"):
            assert study_json["trial_counts"][state] == counts[state], (study_json["trial_counts"], counts)
        budget = study_json["definition"]["budget"]
        assert budget["n_trials"] == self.n_trials
        # the contract, checked on the service's own answers
        used = sum(counts[s] for s in ("complete", "pruned", "running", "waiting"))
        assert used <= budget["n_trials"], f"budget overshot: {used} > {budget['n_trials']}"
        # (max_parallel caps asks: lowered below the running count, it stops no running trial)
        if study_json["state"] == "completed":
            assert counts["complete"] + counts["pruned"] == budget["n_trials"]
            assert counts["running"] == counts["waiting"] == 0
        stored = {t.number: t for t in self.db.optuna.get_all_trials(self._optuna_id(), deepcopy=False)}
        retried: set[int] = set()
        for trial in listed:
            parent_number = trial["retry_of"]
            if parent_number is None:
                continue
            assert parent_number not in retried, f"trial {parent_number} retried twice"
            retried.add(parent_number)
            parent = by_number[parent_number]
            assert parent["state"] == "fail", f"trial {parent_number} is {parent['state']} and retried"
            assert trial["params"] == parent["params"], "a retry changed its parameters"
            handed_back = bool(stored[parent_number].user_attrs.get(RELEASED))
            parent_attempt = int(stored[parent_number].user_attrs.get(ATTEMPT, 0))
            attempt = int(stored[trial["number"]].user_attrs.get(ATTEMPT, 0))
            assert attempt == parent_attempt + (0 if handed_back else 1), "wrong retry count"
            assert attempt <= budget["max_retries"]
            assert stored[trial["number"]].user_attrs.get(RETRY_OF) == parent_number
        failures = sum(
            1
            for t in stored.values()
            if t.state.name == "FAIL" and not t.user_attrs.get(RELEASED) and not t.user_attrs.get(CANCELLED)
        )
        if study_json["state"] in ("queued", "running", "paused"):
            assert failures <= budget["max_failed_trials"], "the study should have failed"
        if study_json["state"] == "failed":
            assert failures > budget["max_failed_trials"], (
                "hand-backs or cancelled trials counted as failures"
            )
        # every trial as the model has it
        assert len(listed) == len(self.trials), (listed, self.trials)
        for model, trial in zip(self.trials, listed, strict=True):
            assert trial["number"] == model.number
            assert (trial["state"], trial["retry_of"]) == (model.state, model.retry_of), (trial, model)
            assert int(stored[model.number].user_attrs.get(ATTEMPT, 0)) == model.attempt, (trial, model)
            if model.params is not None:
                assert trial["params"] == model.params
            if model.lease is not None:
                assert trial["worker_id"] == model.worker
            if model.state in ("complete", "pruned"):
                assert trial["value"] == model.value, (trial, model)
            reason = trial["fail_reason"] or ""
            if model.ended_by == "released":
                assert reason == "handed back by worker"
            elif model.ended_by == "reaped":
                assert reason.startswith("lease expired")
            elif model.ended_by == "cancelled":
                assert reason.startswith("cancelled")
            elif model.ended_by == "told":
                assert reason == "boom"

    def _optuna_id(self) -> int:
        return int(self.db.optuna.get_study_id_from_name(self.name))


@pytest.fixture
def lifecycle_client(db: Database, db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """The app without its background reaper: the test runs the reaper on its own clock."""
    from caviar.service.api import create_app
    from caviar.service.config import Settings

    app_settings = Settings(
        database_url=db_url,
        heartbeat_interval_s=HEARTBEAT_S,
        artifact_dir=str(tmp_path / "artifacts"),
        api_token=None,
        background_tasks=False,
    )
    with TestClient(create_app(app_settings, db=db)) as test_client:
        yield test_client


def test_the_trial_lifecycle_follows_the_model(
    lifecycle_client: TestClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(lifecycle, "utcnow", clock)
    monkeypatch.setattr(store_leases, "utcnow", clock)
    monkeypatch.setattr(
        store_leases, "new_expiry", lambda _d, policy: clock() + timedelta(seconds=policy.lease_s)
    )
    monkeypatch.setattr(store_leases, "fresh_until", lambda _d, seconds: clock() + timedelta(seconds=seconds))
    TrialLifecycle.client, TrialLifecycle.db, TrialLifecycle.clock = lifecycle_client, db, clock
    run_state_machine_as_test(
        TrialLifecycle,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            print_blob=True,
            phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])],
            report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    if os.environ.get("CAVIAR_STATEFUL_VERBOSE"):
        print(sorted(SEEN.items()))  # what the run reached (run with -s)


# ---- the model's anchors: the same rules, as fixed sequences that run every time ----------------


def _study(client: TestClient, name: str, **budget: Any) -> None:
    response = client.post(API, json=external_study(name, **budget))
    assert response.status_code == 201, response.text


def _counts(client: TestClient, name: str) -> tuple[str, dict[str, int]]:
    study = client.get(f"{API}/{name}").json()
    return study["state"], study["trial_counts"]


def test_a_hand_back_keeps_its_retry_and_is_no_failure(lifecycle_client: TestClient) -> None:
    """No retries and no failures allowed: a trial handed back twice still runs, then completes."""
    client = lifecycle_client
    _study(client, "hand-back", n_trials=1, max_retries=0, max_failed_trials=0)
    first = client.post(f"{API}/hand-back/trials/ask", json={"worker_id": "w1"}).json()
    number, params = first["number"], first["params"]
    for _ in range(2):
        released = client.post(f"{API}/hand-back/trials/{number}/release", json={})
        assert released.status_code == 200 and released.json()["state"] == "fail"
        state, counts = _counts(client, "hand-back")
        assert state == "running", "a hand-back counted as a failure"
        assert counts["waiting"] == 1, "a hand-back used up a retry"
        again = client.post(f"{API}/hand-back/trials/ask", json={"worker_id": "w2"})
        assert again.status_code == 200, again.text
        assert again.json()["retry_of"] == number and again.json()["params"] == params
        number = again.json()["number"]
    told = client.post(f"{API}/hand-back/trials/{number}/tell", json={"state": "complete", "value": 1.0})
    assert told.status_code == 200, told.text
    assert _counts(client, "hand-back") == (
        "completed",
        {"waiting": 0, "running": 0, "complete": 1, "pruned": 0, "fail": 2},
    )


def test_reaped_trials_use_their_retries_and_count_as_failures(
    lifecycle_client: TestClient, monkeypatch: pytest.MonkeyPatch, db: Database
) -> None:
    """One retry, one failure allowed: the first lapse is retried, the second fails the study."""
    client = lifecycle_client
    clock = Clock()
    monkeypatch.setattr(lifecycle, "utcnow", clock)
    monkeypatch.setattr(store_leases, "utcnow", clock)
    monkeypatch.setattr(
        store_leases, "new_expiry", lambda _d, policy: clock() + timedelta(seconds=policy.lease_s)
    )
    monkeypatch.setattr(store_leases, "fresh_until", lambda _d, seconds: clock() + timedelta(seconds=seconds))
    _study(client, "lapses", n_trials=1, max_retries=1, max_failed_trials=1)
    first = client.post(f"{API}/lapses/trials/ask", json={}).json()
    assert leases.reap(db, now=clock.advance(LEASE_S + 1)) == 1
    assert _counts(client, "lapses") == (
        "running",
        {"waiting": 1, "running": 0, "complete": 0, "pruned": 0, "fail": 1},
    )
    retry = client.post(f"{API}/lapses/trials/ask", json={}).json()
    assert retry["retry_of"] == first["number"] and retry["params"] == first["params"]
    assert leases.reap(db, now=clock.advance(LEASE_S + 1)) == 1
    assert _counts(client, "lapses") == (
        "failed",
        {"waiting": 0, "running": 0, "complete": 0, "pruned": 0, "fail": 2},
    )
