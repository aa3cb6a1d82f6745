"""HTTP adapter for API tokens (admin scope only; the auth middleware enforces it)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status

import caviar
from caviar.service.auth import SCOPE_LEVELS
from caviar.service.deps import DbDep
from caviar.service.tokens import service
from caviar.service.tokens.schemas import Scope, TokenCreate, TokenCreated, TokenList, WhoAmI

router = APIRouter(prefix="/tokens", tags=["tokens"])
whoami_router = APIRouter(tags=["tokens"])


@whoami_router.get("/whoami", summary="What the calling token may do (any valid token)")
def whoami(request: Request) -> WhoAmI:
    scope: Scope | None = getattr(request.state, "token_scope", None)
    level = SCOPE_LEVELS[scope] if scope is not None else max(SCOPE_LEVELS.values())
    scopes: list[Scope] = [name for name, rank in SCOPE_LEVELS.items() if rank <= level]  # type: ignore[misc]
    return WhoAmI(auth=scope is not None, scope=scope, scopes=scopes, version=caviar.__version__)


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a token (its secret is shown once)")
def create_token(db: DbDep, body: TokenCreate) -> TokenCreated:
    return service.create_token(db, body.scope, body.name)


@router.get("", summary="List tokens (without secrets)")
def list_tokens(db: DbDep, include_revoked: bool = False) -> TokenList:
    return service.list_tokens(db, include_revoked=include_revoked)


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke a token")
def revoke_token(db: DbDep, request: Request, token_id: Annotated[int, Path(ge=1, lt=2**31)]) -> Response:
    service.revoke_token(db, token_id)
    verifier = getattr(request.app.state, "token_verifier", None)
    if verifier is not None:
        verifier.forget()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
