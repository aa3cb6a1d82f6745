"""Whose worker id it is: a ``worker``-scope heartbeat must prove it holds the id's registration.

Kept apart from the heartbeat's lease renewal (:func:`caviar.service.workers.service.beat`): the
router calls :func:`check_holder` first, and a refusal renews nothing.
"""

from __future__ import annotations

from caviar.service.db import Database
from caviar.service.errors import Conflict
from caviar.service.tokens import worker as worker_tokens
from caviar.storage import WorkerRecord


def check_holder(db: Database, key: bytes, worker_id: str, credential: str | None) -> None:
    """Refuse a heartbeat for ``worker_id`` that does not carry its registration's credential.

    An id nobody registered has nothing to protect (the heartbeat renews leases by their own
    credentials and records nothing about the worker), so it passes.

    Args:
        key: the key of worker credentials (:func:`caviar.service.tokens.worker.derive_key`).
        credential: what the caller sent (the ``credential`` its registration answered).

    Raises:
        Conflict: ``not_your_worker``.
    """
    with db.session() as session:
        record = session.get(WorkerRecord, worker_id)
        started_at = record.started_at if record is not None else None
    if started_at is None or worker_tokens.proves(key, credential, worker_id, started_at):
        return
    raise Conflict(
        f"worker {worker_id!r} is registered by another caller: send the credential its "
        "registration answered, or register a new worker id",
        code="not_your_worker",
    )
