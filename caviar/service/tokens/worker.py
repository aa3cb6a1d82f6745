"""Worker credentials: the proof that a caller is the one that registered a worker id.

With tokens on, ``POST /api/v1/workers`` answers a ``credential`` for the id it registered; a
``worker``-scope caller sends it with every heartbeat of that id (``POST /workers/{id}/heartbeat``,
body field ``credential``). A heartbeat without it, or with one for another registration, is
refused (409 ``not_your_worker``) and changes nothing: one worker token, often shared by every
machine, cannot mark another worker seen, busy or stopped, nor rewrite its current trials.

A credential is ``cvw_<registration start>.<mac>``: an HMAC-SHA256 (keyed by a key derived from
the admin token, so every replica agrees and nothing is stored) over the worker id and when its
registration started (microseconds). Registering the id again (allowed once the old registration
is no longer live) starts a new registration, so the old credential stops working.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime
from typing import Final

from caviar.service.tokens.trial import stamp_of

PREFIX: Final = "cvw_"
_FORM: Final = re.compile(r"^cvw_(\d{1,20})\.([0-9a-f]{64})$")


def derive_key(admin_token: str) -> bytes:
    """The HMAC key of worker credentials (derived from the admin token: rotating it revokes them)."""
    return hashlib.sha256(
        b"caviar worker credential\x00" + admin_token.encode("utf-8", "surrogatepass")
    ).digest()


def _mac(key: bytes, worker_id: str, stamp: int) -> str:
    return hmac.new(key, f"{stamp}.{worker_id}".encode(), hashlib.sha256).hexdigest()


def mint(key: bytes, worker_id: str, started_at: datetime) -> str:
    """The credential of the registration of ``worker_id`` that started at ``started_at``."""
    stamp = stamp_of(started_at)
    return f"{PREFIX}{stamp}.{_mac(key, worker_id, stamp)}"


def proves(key: bytes, credential: str | None, worker_id: str, started_at: datetime) -> bool:
    """Whether ``credential`` is the one the registration of ``worker_id`` at ``started_at`` answered."""
    match = _FORM.match(credential) if credential else None
    if match is None:
        return False
    stamp, mac = int(match.group(1)), match.group(2)
    return stamp == stamp_of(started_at) and hmac.compare_digest(_mac(key, worker_id, stamp), mac)
