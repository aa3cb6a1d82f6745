"""Token operations: create, list, revoke and look up API tokens.

A token is ``cvr_`` + ``secrets.token_urlsafe(32)`` (256 bits of entropy); the database keeps
only its SHA-256 hash and its first characters. Looking a presented token up by its hash needs
no constant-time comparison: nobody can steer the hash of a guess towards a stored one.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update

from caviar.service.db import Database
from caviar.service.errors import NotFound
from caviar.service.tokens.schemas import Scope, TokenCreated, TokenList, TokenRead
from caviar.storage import ApiToken, utcnow

TOKEN_PREFIX = "cvr_"
_SHOWN_CHARS = 12
LAST_USED_RESOLUTION = timedelta(minutes=1)
"""``last_used_at`` is written at most this often per token (not on every request)."""


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token: what the database stores."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> str:
    """A fresh high-entropy token with caviar's prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _read(row: ApiToken) -> TokenRead:
    return TokenRead.model_validate(row, from_attributes=True)


def create_token(db: Database, scope: Scope, name: str | None = None) -> TokenCreated:
    """Create a token; the result carries the secret, which is not stored anywhere."""
    secret = new_secret()
    row = ApiToken(
        name=name or scope, scope=scope, token_hash=hash_token(secret), prefix=secret[:_SHOWN_CHARS]
    )
    with db.session() as session:
        session.add(row)
        session.commit()
        session.refresh(row)
        return TokenCreated(**_read(row).model_dump(), token=secret)


def list_tokens(db: Database, *, include_revoked: bool = False) -> TokenList:
    """Every token (without secrets), oldest first."""
    query = select(ApiToken).order_by(ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    with db.session() as session:
        items = [_read(row) for row in session.scalars(query)]
    return TokenList(items=items, total=len(items))


def revoke_token(db: Database, token_id: int) -> TokenRead:
    """Revoke a token (revoking it again changes nothing).

    Raises:
        NotFound: no token has this id.
    """
    with db.session() as session:
        row = session.get(ApiToken, token_id)
        if row is None:
            raise NotFound(f"no token with id {token_id}", code="token_not_found")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            session.commit()
            session.refresh(row)
        return _read(row)


def lookup_scope(db: Database, token: str) -> tuple[int, Scope, datetime | None] | None:
    """The id, scope and last use of a live (unrevoked) token, or None for an unknown one."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    with db.session() as session:
        row = session.execute(
            select(ApiToken.id, ApiToken.scope, ApiToken.last_used_at).where(
                ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None)
            )
        ).first()
    if row is None:
        return None
    scope: Scope = row.scope
    return row.id, scope, row.last_used_at


def touch_token(db: Database, token_id: int) -> None:
    """Record that a token was used now."""
    with db.session() as session:
        session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=utcnow()))
        session.commit()
