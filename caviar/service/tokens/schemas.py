"""Request and response schemas of API tokens (a secret is shown once, at creation)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Scope = Literal["read", "worker", "write", "admin"]
TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._@:-]{0,99}$"


class TokenCreate(BaseModel):
    """What ``POST /api/v1/tokens`` accepts."""

    model_config = ConfigDict(extra="forbid")

    scope: Scope = Field(
        description="read: GET only; worker: + trial ask/report/heartbeat/tell; "
        "write: everything but tokens; admin: everything."
    )
    name: str | None = Field(
        default=None, pattern=TOKEN_NAME_PATTERN, max_length=100, description="A label (default: the scope)."
    )


class TokenRead(BaseModel):
    """A token as listed: never its secret, only the first characters to recognise it."""

    id: int
    name: str
    scope: Scope
    prefix: str = Field(description="The first characters of the token, to recognise it.")
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class WhoAmI(BaseModel):
    """What the credential of a request may do (``GET /api/v1/whoami``)."""

    auth: bool = Field(description="Whether the service asks for tokens at all.")
    scope: Scope | None = Field(description="The token's scope (null when the service has no auth).")
    scopes: list[Scope] = Field(description="Every scope this credential satisfies (scopes are ordered).")
    version: str = Field(description="The service's caviar version.")


class TokenCreated(TokenRead):
    """A new token, with its secret: shown once, stored only as a hash."""

    token: str = Field(description="The secret bearer token; it cannot be shown again.")


class TokenList(BaseModel):
    items: list[TokenRead]
    total: int = Field(ge=0)
