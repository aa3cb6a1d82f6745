"""Stateful fuzzing with a credential of each scope, the dashboard's routes included.

The same live service (tokens on, a seeded study with trials and a stored file) is fuzzed once per
credential: a ``read``, ``worker``, ``write`` and ``admin`` token as Bearer, and the dashboard's
own way in, HTTP Basic with the token as the password from a page of the service's origin (a read
and a write token). The OpenAPI schema is the API's own plus :func:`dashboard_schema`, a
hand-written one of optuna-dashboard's routes (it has none). Every answer must not be a 5xx, and
an answer to a credential whose scope is too small for the request (:func:`needed_scope`, this
test's own statement of the policy in docs/security.md, not the middleware's table) must be 401 or
403: never a 2xx write with a read token. A credential with the scope is never refused for want
of it.

Bounded for CI (``EXAMPLES`` sequences of ``STEPS`` calls per credential); ``CAVIAR_TEST_LONG=1``
runs many more. The seed changes every run and is printed; replay with ``CAVIAR_FUZZ_SEED``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis
import hypothesis.core
import hypothesis.errors
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis.checks import positive_data_acceptance

from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from tests.conftest import LONG_RUN
from tests.service.helpers import external_study
from tests.service.test_dashboard import free_port, live_server
from tests.service.test_fuzz_stateful import VALID_BODIES

pytestmark = pytest.mark.slow
ADMIN = "scope-fuzzing-admin-token-0123456789abcdef"
EXAMPLES = 60 if LONG_RUN else 6
STEPS = 30 if LONG_RUN else 12
LEVELS = {"read": 0, "worker": 1, "write": 2, "admin": 3}
CREDENTIALS = ["read", "worker", "write", "admin", "dashboard-read", "dashboard-write"]

WORKER_POSTS = frozenset(
    {
        "/api/v1/studies/{name}/trials/ask",
        "/api/v1/studies/{name}/trials/reports",
        *(
            f"/api/v1/studies/{{name}}/trials/{{number}}/{action}"
            for action in ("report", "suggest", "heartbeat", "tell", "release", "artifacts")
        ),
        "/api/v1/workers",
        "/api/v1/workers/{worker_id}/heartbeat",
    }
)
"""The writes a worker token may make (docs/security.md): the trial lifecycle, uploads, its registry."""


def needed_scope(method: str, template: str, path_parameters: dict[str, Any]) -> str | None:
    """The least scope a request needs, as docs/security.md states it (None: open to anyone)."""
    if template == "/healthz":
        return None
    if template.startswith("/api/v1/tokens"):
        return "admin"
    if method in ("GET", "HEAD", "OPTIONS"):
        # a trial's log may hold its environment: the scope that sees objective.env values
        log = template.endswith("/artifacts/{filename}") and path_parameters.get("filename") == "trial.log"
        return "worker" if log else "read"
    if method == "POST" and template in WORKER_POSTS:
        return "worker"
    return "write"  # every other write, the dashboard's included


def _op(
    summary: str, params: list[str] | None = None, body: dict[str, Any] | None = None, **params_schema: Any
) -> dict[str, Any]:
    integer = {"type": "integer", "minimum": 0, "maximum": 2**40}
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": [
            {"name": p, "in": "path", "required": True, "schema": params_schema.get(p, integer)}
            for p in params or []
        ],
        "responses": {"default": {"description": "anything but a 5xx"}},
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return operation


def dashboard_schema() -> dict[str, Any]:
    """optuna-dashboard's routes (0.21), as OpenAPI paths: it documents none itself."""
    artifact = {"type": "string", "pattern": r"^[0-9a-f-]{1,40}$"}
    text = {"type": "string", "maxLength": 40}
    note = {"type": "object", "properties": {"version": {"type": "integer"}, "body": text}}
    study = ["study_id"]
    return {
        "/dashboard": {"get": _op("the single-page app")},
        "/favicon.ico": {"get": _op("icon")},
        "/api/meta": {"get": _op("meta")},
        "/api/studies": {
            "get": _op("studies"),
            "post": _op(
                "create a study",
                body={
                    "type": "object",
                    "properties": {
                        "study_name": text,
                        "directions": {"type": "array", "items": {"enum": ["minimize", "maximize"]}},
                    },
                },
            ),
        },
        "/api/studies/{study_id}": {
            "get": _op("detail", study),
            "delete": _op(
                "delete",
                study,
                {"type": "object", "properties": {"remove_associated_artifacts": {"type": "boolean"}}},
            ),
        },
        "/api/studies/{study_id}/rename": {
            "post": _op("rename", study, {"type": "object", "properties": {"study_name": text}})
        },
        "/api/studies/{study_id}/param_importances": {"get": _op("importances", study)},
        "/api/studies/{study_id}/plot/{plot_type}": {
            "get": _op(
                "plot",
                ["study_id", "plot_type"],
                plot_type={
                    "enum": ["contour", "slice", "parallel_coordinate", "rank", "edf", "timeline", "x"]
                },
            )
        },
        "/api/studies/{study_id}/note": {"put": _op("study note", study, note)},
        "/api/studies/{study_id}/preference": {"post": _op("preference", study, {"type": "object"})},
        "/api/studies/{study_id}/preference_feedback_component": {
            "put": _op("feedback component", study, {"type": "object", "properties": {"output_type": text}})
        },
        "/api/studies/{study_id}/preference/{history_id}": {
            "post": _op("restore preference", ["study_id", "history_id"], history_id=text),
            "delete": _op("remove preference", ["study_id", "history_id"], history_id=text),
        },
        "/api/trials/{trial_id}/tell": {
            "post": _op(
                "tell",
                ["trial_id"],
                {
                    "type": "object",
                    "properties": {
                        "state": {"enum": ["Complete", "Fail", "Pruned", "x"]},
                        "values": {"type": "array", "items": {"type": "number"}},
                    },
                },
            )
        },
        "/api/trials/{trial_id}/user-attrs": {
            "post": _op(
                "trial user attributes",
                ["trial_id"],
                {"type": "object", "properties": {"user_attrs": {"type": "object"}}},
            )
        },
        "/api/studies/{study_id}/{trial_id}/skip": {"post": _op("skip", ["study_id", "trial_id"])},
        "/api/studies/{study_id}/{trial_id}/note": {"put": _op("trial note", ["study_id", "trial_id"], note)},
        "/csv/{study_id}": {"get": _op("csv", study)},
        "/artifacts/{study_id}/{artifact_id}": {
            "get": _op("study file", ["study_id", "artifact_id"], artifact_id=artifact)
        },
        "/artifacts/{study_id}/{trial_id}/{artifact_id}": {
            "get": _op("trial file", ["study_id", "trial_id", "artifact_id"], artifact_id=artifact)
        },
        "/api/artifacts/{study_id}": {
            "post": _op("upload a study file", study, {"type": "object", "properties": {"file": text}})
        },
        "/api/artifacts/{study_id}/{trial_id}": {
            "post": _op(
                "upload a trial file",
                ["study_id", "trial_id"],
                {"type": "object", "properties": {"file": text}},
            )
        },
        "/api/artifacts/{study_id}/{artifact_id}": {
            "delete": _op("delete a study file", ["study_id", "artifact_id"], artifact_id=artifact)
        },
        "/api/artifacts/{study_id}/{trial_id}/{artifact_id}": {
            "delete": _op(
                "delete a trial file", ["study_id", "trial_id", "artifact_id"], artifact_id=artifact
            )
        },
        "/api/llm/trial_filter_query": {"post": _op("LLM filter", body={"type": "object"})},
        "/api/llm/generate_plotly_graph_query": {"post": _op("LLM graph", body={"type": "object"})},
    }


@pytest.fixture(scope="module")
def live(databases, tmp_path_factory) -> Iterator[tuple[str, dict[str, str], dict[str, list[Any]]]]:  # type: ignore[no-untyped-def]
    """The service with tokens on, one token per scope, and what exists in it (to aim requests at)."""
    url = databases.migrated()
    settings = Settings(
        database_url=url,
        artifact_dir=str(tmp_path_factory.mktemp("scope-artifacts")),
        api_token=SecretStr(ADMIN),
        background_tasks=False,
    )
    db = Database(url)
    try:
        with live_server(create_app(settings, db=db), free_port()) as base, requests.Session() as admin:
            admin.headers["Authorization"] = f"Bearer {ADMIN}"
            api = f"{base}/api/v1"
            tokens = {"admin": ADMIN}
            for scope in ("read", "worker", "write"):
                tokens[scope] = admin.post(f"{api}/tokens", json={"scope": scope}, timeout=30).json()["token"]
            assert admin.post(f"{api}/studies", json=external_study("seeded"), timeout=30).status_code == 201
            numbers = [
                admin.post(f"{api}/studies/seeded/trials/ask", json={}, timeout=30).json()["number"]
                for _ in range(3)
            ]
            admin.post(
                f"{api}/studies/seeded/trials/{numbers[0]}/tell",
                json={"state": "complete", "value": 0.5},
                timeout=30,
            )
            stored = admin.post(
                f"{api}/studies/seeded/trials/{numbers[1]}/artifacts",
                params={"filename": "trial.log"},
                data=b"a log",
                headers={"Content-Type": "application/octet-stream"},
                timeout=30,
            )
            assert stored.status_code == 201, stored.text
            summaries = admin.get(f"{base}/api/studies", timeout=30).json()["study_summaries"]
            detail = admin.get(f"{base}/api/studies/{summaries[0]['study_id']}", timeout=30).json()
            known = {
                "name": ["seeded"],
                "number": numbers,
                "filename": ["trial.log", "checkpoint.pt"],
                "study_id": [s["study_id"] for s in summaries],
                "trial_id": [t["trial_id"] for t in detail["trials"]],
                "worker_id": ["w-1"],
            }
            yield base, tokens, known
    finally:
        db.dispose()


def headers_for(credential: str, tokens: dict[str, str], base: str) -> dict[str, str]:
    """A worker, script or SDK sends Bearer; a browser on the dashboard sends Basic and its Origin."""
    if credential.startswith("dashboard-"):
        secret = base64.b64encode(f"me:{tokens[credential.removeprefix('dashboard-')]}".encode()).decode()
        return {"Authorization": f"Basic {secret}", "Origin": base}
    return {"Authorization": f"Bearer {tokens[credential]}"}


@pytest.mark.parametrize("credential", CREDENTIALS)
def test_every_scope_is_refused_what_it_may_not_do_and_never_fails_the_server(live, credential: str) -> None:  # type: ignore[no-untyped-def]
    base, tokens, known = live
    seed = int(os.environ.get("CAVIAR_FUZZ_SEED") or random.randrange(2**32))
    print(f"\nscope fuzzing ({credential}) seed: {seed} (replay with CAVIAR_FUZZ_SEED={seed})")
    scope = credential.removeprefix("dashboard-")
    level = LEVELS[scope]
    document = requests.get(
        f"{base}/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
    ).json()
    document["paths"].update(dashboard_schema())
    schema = schemathesis.openapi.from_dict(document)
    answered: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    session = requests.Session()
    session.headers.update(headers_for(credential, tokens, base))

    @schema.hook
    def before_generate_path_parameters(
        context: schemathesis.HookContext, strategy: st.SearchStrategy
    ) -> st.SearchStrategy:  # type: ignore[type-arg]
        # random names and ids find nothing: aim half the requests at what exists
        def aimed(params: Any) -> st.SearchStrategy:  # type: ignore[type-arg]
            if not isinstance(params, dict) or not params:  # none, or schemathesis's own wrapper
                return st.just(params)
            swaps = {k: st.sampled_from(known[k]) for k in params if k in known}
            return st.fixed_dictionaries({**{k: st.just(v) for k, v in params.items()}, **swaps})

        return st.one_of(strategy, strategy.flatmap(aimed))

    @schema.hook
    def before_generate_body(
        context: schemathesis.HookContext, strategy: st.SearchStrategy
    ) -> st.SearchStrategy:  # type: ignore[type-arg]
        label = context.operation.label if context.operation is not None else ""
        valid = VALID_BODIES.get(label)
        return strategy if valid is None else st.one_of(strategy, valid)

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def call(self, case: schemathesis.Case, **kwargs: object) -> schemathesis.Response:
            response = case.call(base_url=base, session=session, **kwargs)  # type: ignore[arg-type]
            method, template = case.operation.method.upper(), case.operation.path
            status = response.status_code
            answered[(case.operation.label, status)] += 1
            needed = needed_scope(method, template, dict(case.path_parameters or {}))
            where = f"{credential}: {method} {case.formatted_path} -> {status} {response.text[:300]}"
            if status >= 500:
                failures.append(f"server error: {where}")
            elif needed is not None and level < LEVELS[needed] and status not in (401, 403):
                failures.append(f"needs {needed}, not refused: {where}")
            elif (
                needed is not None
                and level >= LEVELS[needed]
                and (status == 401 or (status == 403 and '"forbidden"' in response.text))
            ):
                failures.append(f"has {needed} scope, refused: {where}")
            return response

        def validate_response(
            self, response: schemathesis.Response, case: schemathesis.Case, **kwargs: object
        ) -> None:
            if case.operation.path.startswith("/api/v1/"):  # the dashboard documents no answers
                try:
                    case.validate_response(response, excluded_checks=[positive_data_acceptance])
                except Exception as exc:  # recorded, not raised: the run goes on and reports them all
                    failures.append(f"{credential}: {case.operation.label}: {exc}"[:2000])

    previous = hypothesis.core.global_force_seed
    settings = hypothesis.settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    try:
        hypothesis.core.global_force_seed = seed
        with contextlib.suppress(hypothesis.errors.Flaky):
            Machine.run(settings=settings)
    finally:
        hypothesis.core.global_force_seed = previous
        session.close()
    calls = sum(answered.values())
    labels = {label for label, _ in answered}
    print(f"{calls} calls, {len(labels)} operations, statuses: {Counter(s for _, s in answered.elements())}")
    assert not failures, "\n\n".join(sorted(set(failures))[:20])
    assert calls >= EXAMPLES * 3
    # the dashboard's routes were reached, and so were the API's writes
    assert any(not label.split(" ", 1)[1].startswith("/api/v1/") for label in labels), labels
    assert any(label.startswith(("POST", "PUT", "PATCH", "DELETE")) for label in labels), labels
