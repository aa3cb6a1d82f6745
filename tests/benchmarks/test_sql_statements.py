"""The statement-count benchmark runs, and caviar's REST path stays within a bound of raw Optuna's.

Counts are deterministic (no timing): a change that makes every ask, report or tell read the
history again, or a trial twice, shows up here.
"""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import sql_statements
from tests.conftest import IS_POSTGRES


def test_caviar_sends_no_more_statements_than_raw_optuna(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = "postgres" if IS_POSTGRES else "sqlite"
    argv = ["sql_statements", "--storage", storage, "--history", "30", "--cycles", "3", "--repeats", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    sql_statements.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    caviar, optuna = result["caviar"]["statements_per_cycle"], result["optuna"]["statements_per_cycle"]
    # ask + report + tell, caviar's lease, budget count and study row included
    assert 0 < caviar <= optuna, result
