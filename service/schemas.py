"""Schemas shared by every router: the error envelope."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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
