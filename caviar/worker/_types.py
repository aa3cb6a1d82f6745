"""What a runner needs of its slot, as a protocol: the runners (``_program``, ``_trainer``) type
their slot with it, so they need not import ``_slot`` (which imports them: no circle, not even
under ``TYPE_CHECKING``)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from caviar._client import Client, Trial
from caviar.worker._options import WorkerOptions


class SlotLike(Protocol):
    """The part of :class:`caviar.worker._slot.Slot` that runners use."""

    options: WorkerOptions
    device: str
    threads: int
    worker_id: str
    client: Client
    stop: threading.Event

    def ask(self, study: str, *, fixed: dict[str, Any] | None = None) -> Trial | None: ...

    def should_prune(self, trial: Trial, step: int, value: float) -> bool: ...

    def should_prune_many(self, reports: Sequence[tuple[Trial, int, float]]) -> list[bool]: ...

    def finish(
        self,
        trial: Trial,
        state: str,
        *,
        values: list[float] | None = None,
        reason: str | None = None,
        user_attrs: dict[str, Any] | None = None,
        fatal: bool = False,
    ) -> None: ...

    def hand_back(self, trial: Trial, reason: str) -> None: ...

    def is_lost(self, trial: Trial) -> bool: ...

    def still_held(self, trials: list[Trial]) -> list[Trial]: ...


class Runner(Protocol):
    """Runs the trials of one objective kind for a slot."""

    def run(self, study: dict[str, Any]) -> bool:
        """Claim and run trials of ``study``; False when there was nothing to claim."""
        ...
