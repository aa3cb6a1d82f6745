"""Property-based fuzzing of the REST API with schemathesis, from the app's own OpenAPI schema.

Every documented operation gets up to 25 generated requests per generation mode (valid, then
invalid data), with a fixed Hypothesis seed (``derandomize``); every response must not be a 5xx
and must conform to the documented status codes, content types, headers and schemas. (Not
checked: that every schema-valid request is accepted -- semantic rules such as "low < high" or
"a non-empty search space" answer 422 on purpose and are not expressible in JSON Schema.)
Requests go to a live uvicorn server on a free loopback port, on a fresh database shared by the
module (operations see each other's studies, as real clients do).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.errors import UnsupportedSchema

from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from tests.service.test_dashboard import free_port, live_server

MAX_EXAMPLES = 25


def _operation_labels() -> list[str]:
    app = create_app(Settings(database_url="sqlite://", background_tasks=False))
    schema = schemathesis.openapi.from_dict(app.openapi())
    return [result.ok().label for result in schema.get_all_operations()]


OPERATIONS = _operation_labels()


@pytest.fixture(scope="module")
def live_schema(databases, tmp_path_factory) -> Iterator[tuple[schemathesis.BaseSchema, requests.Session]]:  # type: ignore[no-untyped-def]
    url = databases.migrated()
    settings = Settings(
        database_url=url,
        artifact_dir=str(tmp_path_factory.mktemp("fuzz-artifacts")),
        api_token=None,
        background_tasks=False,
    )
    db = Database(url)
    try:
        with live_server(create_app(settings, db=db), free_port()) as base, requests.Session() as session:
            yield schemathesis.openapi.from_url(f"{base}/openapi.json"), session
    finally:
        db.dispose()


def test_every_route_is_fuzzed() -> None:
    assert len(OPERATIONS) >= 20
    assert "POST /api/v1/studies/{name}/trials/ask" in OPERATIONS
    assert "POST /api/v1/tokens" in OPERATIONS


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("label", OPERATIONS)
def test_api_conforms_to_its_openapi_schema(label: str, mode: GenerationMode, live_schema) -> None:  # type: ignore[no-untyped-def]
    schema, session = live_schema
    method, path = label.split(" ", 1)
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(session=session, excluded_checks=[positive_data_acceptance])

    try:
        run()
    except Unsatisfiable:
        # Nothing about this operation can be made invalid (e.g. only free-form string path
        # parameters): there are no negative cases to send.
        assert mode is GenerationMode.NEGATIVE
    except UnsupportedSchema as exc:
        # schemathesis 4 sometimes cannot negate a nested schema (a `not` it cannot spell
        # out); that limits the tool, not the API, and only for invalid-data generation.
        if mode is not GenerationMode.NEGATIVE:
            raise
        pytest.skip(f"schemathesis cannot generate invalid data here: {exc}")
