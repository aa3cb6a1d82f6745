"""The one error envelope: ``{"error": {"code", "message", "details"}}`` for every error answer.

Domain errors, validation errors and Starlette's HTTP errors are mapped onto it in one place
(:func:`install_error_handlers`); the middleware (auth, body cap, dashboard guard) answers with
:func:`error_response`; routers document it with :func:`error_responses`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from caviar.service.errors import CaviarError, validation_details

_log = logging.getLogger("caviar.api")


class ErrorBody(BaseModel):
    code: str = Field(description="snake_case error code, e.g. name_taken, budget_exhausted")
    message: str = Field(description="A human sentence saying what went wrong")
    details: list[Any] = Field(default_factory=list)


class ErrorEnvelope(BaseModel):
    """Every error the API answers with."""

    error: ErrorBody


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting the error envelope for ``codes``."""
    return {code: {"model": ErrorEnvelope, "description": "Error"} for code in codes}


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one error envelope: ``{"error": {"code", "message", "details"}}``."""
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers or None)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


_BODY_PARSE_ERROR = "There was an error parsing the body"
"""FastAPI's 400 for a body it cannot decode: answered as the 422 of any other malformed JSON."""


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors and Starlette's HTTP errors onto the envelope."""

    @app.exception_handler(CaviarError)
    async def _domain(_: Request, exc: CaviarError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else {}
        return error_response(exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc.errors())
        first = details[0] if details else {"field": "", "message": "invalid request"}
        if first.get("type") == "json_invalid":
            message = "request body is not valid JSON"
        else:
            message = f"{first['field'] or 'body'}: {first['message']}"
        return error_response(422, "validation_error", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:  # e.g. a body that is not UTF-8
            return error_response(422, "validation_error", "request body is not valid JSON")
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = dict(exc.headers or {})
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        cause = database_cause(exc)
        if isinstance(cause, DataError):
            return error_response(
                422, "invalid_data", "a value cannot be stored: out of range or with invalid characters"
            )
        if cause is not None:
            _log.warning(
                "database unavailable on %s %s: %s", request.method, request.url.path, type(cause).__name__
            )
            return error_response(
                503,
                "database_unavailable",
                "the database cannot be reached; retry shortly",
                headers={"Retry-After": str(DB_RETRY_AFTER_S)},
            )
        _log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal_error", "internal server error (this is a bug; see the server log)"
        )


DB_RETRY_AFTER_S = 2
_OUTAGES = (OperationalError, InterfaceError, PoolTimeout, DisconnectionError)


def database_cause(exc: BaseException) -> BaseException | None:
    """The database error behind ``exc`` (Optuna wraps them), if it is an outage or a DataError."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (DataError, *_OUTAGES)):
            return current
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return current
        current = current.__cause__ or current.__context__
    return None
