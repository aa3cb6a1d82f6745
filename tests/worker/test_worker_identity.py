"""A slot proves its worker id with its registration's credential, and restarts when it lost the id."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from caviar._errors import CaviarApiError
from caviar.worker._api import WorkerApi
from caviar.worker._slot import Slot


def test_every_heartbeat_carries_the_credential_the_registration_answered() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    class Http:
        def post(self, path: str, json: dict[str, Any]) -> dict[str, Any]:
            sent.append((path, json))
            if path.endswith("/workers"):
                return {"heartbeat_interval_s": 1.0, "credential": "cvw_1.abc"}
            return {"lost": []}

    api = WorkerApi(SimpleNamespace(http=Http()), "w-1")  # type: ignore[arg-type]
    assert api.register(host="h", pid=1, device="cpu") == 1.0
    api.beat([("s", 0, "cvt_x")], status="busy")
    api.beat([], status="stopped")
    assert [body.get("credential") for _, body in sent[1:]] == ["cvw_1.abc", "cvw_1.abc"]
    assert sent[1][1]["trials"] == [{"study": "s", "number": 0, "credential": "cvt_x"}]


def test_a_service_without_tokens_gets_no_credential_and_none_is_sent() -> None:
    sent: list[dict[str, Any]] = []

    class Http:
        def post(self, path: str, json: dict[str, Any]) -> dict[str, Any]:
            sent.append(json)
            return (
                {"heartbeat_interval_s": 1.0, "credential": None}
                if path.endswith("/workers")
                else {"lost": []}
            )

    api = WorkerApi(SimpleNamespace(http=Http()), "w-1")  # type: ignore[arg-type]
    api.register(host="h", pid=1, device="cpu")
    api.beat([], status="idle")
    assert "credential" not in sent[1]


def test_a_slot_whose_id_was_registered_again_elsewhere_stops_to_restart_under_a_new_id() -> None:
    done, statuses = threading.Event(), []

    def beat(held: Any, *, status: str) -> list[Any]:
        statuses.append(status)
        if len(statuses) >= 3:
            done.set()
        raise CaviarApiError(409, "not_your_worker", "worker 'w-1' is registered by another caller")

    slot = SimpleNamespace(
        done=done,
        heartbeat_interval_s=0.02,
        held_lock=threading.Lock(),
        held={},
        lost=set(),
        stopping=set(),
        api=SimpleNamespace(beat=beat),
        displaced=False,
        stop=threading.Event(),
        worker_id="w-1",
    )
    Slot._heartbeat_loop(slot)  # type: ignore[arg-type]
    assert slot.displaced and slot.stop.is_set()  # the loop ends its trials; run() then raises

    # any other refusal is only logged: the slot goes on
    other = SimpleNamespace(
        **{**vars(slot), "displaced": False, "stop": threading.Event(), "done": threading.Event()}
    )
    count = []

    def failing(held: Any, *, status: str) -> list[Any]:
        count.append(status)
        if len(count) >= 2:
            other.done.set()
        raise CaviarApiError(503, "database_unavailable", "down")

    other.api = SimpleNamespace(beat=failing)
    Slot._heartbeat_loop(other)  # type: ignore[arg-type]
    assert not other.displaced and not other.stop.is_set()
