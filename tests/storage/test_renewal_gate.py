"""SQLite's lease renewals go before the process's other transactions (RenewalGate)."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import text

from caviar.storage import make_engine, renewal_gate
from caviar.storage._engine import RenewalGate


def test_a_transaction_begins_only_once_no_renewal_is_pending() -> None:
    gate = RenewalGate(max_wait_s=60)
    began = threading.Event()

    def other_write() -> None:
        gate.yield_to_renewals()
        began.set()

    with gate.renewal():
        thread = threading.Thread(target=other_write, daemon=True)
        thread.start()
        assert not began.wait(0.2)  # held back while the renewal is pending
    assert began.wait(30)
    thread.join(30)


def test_sqlite_engines_yield_to_renewals_but_the_renewal_engine_does_not(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gate.db'}"
    gate = renewal_gate(url)
    other, renewals = make_engine(url), make_engine(url, for_renewals=True)
    began = threading.Event()

    def other_write() -> None:
        with other.begin() as connection:
            began.set()
            connection.execute(text("SELECT 1"))

    try:
        with gate.renewal():
            with renewals.begin() as connection:  # the renewal's own engine never waits for itself
                connection.execute(text("SELECT 1"))
            thread = threading.Thread(target=other_write, daemon=True)
            thread.start()
            assert not began.wait(0.2)
        assert began.wait(30)
        thread.join(30)
    finally:
        other.dispose()
        renewals.dispose()
