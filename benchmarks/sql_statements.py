"""SQL statements and latency of one ask + report + tell: caviar's REST path against raw Optuna.

Both arms run in this process on the same database, with the same search space, TPE sampler and
history of imported results: (a) caviar's API through an in-process ``TestClient`` (the HTTP
layer without a socket: what is measured is the service's own work), (b) ``study.ask()``,
``trial.report()``, ``trial.should_prune()``, ``study.tell()`` on Optuna's RDBStorage. Every SQL
statement either arm sends is counted with a SQLAlchemy event. The arms alternate per repeat.

    python benchmarks/sql_statements.py [--storage sqlite|postgres] [--history 300] [--cycles 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402

from benchmarks.service_throughput import definition as study_definition  # noqa: E402
from caviar import storage  # noqa: E402
from caviar.service.api import create_app  # noqa: E402
from caviar.service.config import Settings  # noqa: E402
from caviar.service.db import Database  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


class StatementCounter:
    """Counts the statements every engine of this process sends to ``database`` while ``counting``
    is on (only there: a process that runs this, the test suite's, may talk to other databases)."""

    def __init__(self, database: str | None) -> None:
        self.database = database
        self.count = 0
        self.counting = False
        event.listen(Engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Connection, *_: Any) -> None:
        if self.counting and conn.engine.url.database == self.database:
            self.count += 1

    @contextmanager
    def measure(self) -> Iterator[None]:
        self.counting = True
        try:
            yield
        finally:
            self.counting = False


@contextmanager
def database(kind: str) -> Iterator[str]:
    """A fresh, migrated database URL: a temporary SQLite file or a new PostgreSQL database."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{folder}/bench.db"
            storage.upgrade(url)
            yield url
        return
    name = f"bench_sql_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    try:
        storage.upgrade(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def history(n: int) -> list[dict[str, Any]]:
    """``n`` imported results spread over the space (decoded values, as users write them)."""
    return [
        {
            "params": {
                "lr": 10 ** (-4 + 3 * i / n),
                "beta1": 0.8 + 0.19 * (i % 7) / 7,
                "dropout": 0.6 * (i % 5) / 5,
            },
            "value": float(i % 11),
        }
        for i in range(n)
    ]


def caviar_arm(url: str, n_history: int) -> Callable[[], None]:
    """One ask + report + tell over caviar's API; the study has ``n_history`` results."""
    db = Database(url)
    settings = Settings(database_url=url, background_tasks=False)
    client = TestClient(create_app(settings, db=db))
    name = f"sql-{uuid.uuid4().hex[:8]}"
    definition = study_definition(name, 1_000_000)
    definition |= {"sampler": {"type": "tpe", "seed": 0}, "pruner": {"type": "median"}}
    client.post("/api/v1/studies", json=definition).raise_for_status()
    items = history(n_history)
    for start in range(0, len(items), 1000):
        client.post(f"/api/v1/studies/{name}/trials/enqueue", json={"trials": items[start : start + 1000]})
    base = f"/api/v1/studies/{name}/trials"

    def cycle() -> None:
        trial = client.post(f"{base}/ask", json={}).json()
        number = trial["number"]
        client.post(f"{base}/{number}/report", json={"step": 0, "value": 0.5}).raise_for_status()
        client.post(f"{base}/{number}/tell", json={"state": "complete", "value": 0.5}).raise_for_status()

    return cycle


DISTRIBUTIONS: dict[str, optuna.distributions.BaseDistribution] = {
    "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
    "one_minus_beta1": optuna.distributions.FloatDistribution(0.001, 0.2, log=True),
    "dropout": optuna.distributions.FloatDistribution(0.0, 0.6),
}
"""The space of :func:`history` as raw Optuna stores it (beta1 as ``one_minus_beta1``)."""


def seeded_study(storage: optuna.storages.BaseStorage | str, prefix: str, n_history: int) -> optuna.Study:
    """A new raw Optuna study (TPE, median pruner) holding :func:`history`'s ``n_history`` results."""
    study = optuna.create_study(
        study_name=f"{prefix}-{uuid.uuid4().hex[:8]}",
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(),
    )
    study.add_trials(
        [
            optuna.trial.create_trial(
                params={
                    "lr": p["params"]["lr"],
                    "one_minus_beta1": 1 - p["params"]["beta1"],
                    "dropout": p["params"]["dropout"],
                },
                distributions=DISTRIBUTIONS,
                value=p["value"],
            )
            for p in history(n_history)
        ]
    )
    return study


def optuna_arm(url: str, n_history: int) -> Callable[[], None]:
    """The same cycle with raw Optuna: ask, report, should_prune, tell."""
    study = seeded_study(optuna.storages.RDBStorage(url), "raw", n_history)

    def cycle() -> None:
        trial = study.ask(DISTRIBUTIONS)
        trial.report(0.5, 0)
        trial.should_prune()
        study.tell(trial, 0.5)

    return cycle


def measure(cycle: Callable[[], None], counter: StatementCounter, cycles: int) -> dict[str, float]:
    cycle()  # warm caches and connections
    seconds: list[float] = []
    before = counter.count
    with counter.measure():
        for _ in range(cycles):
            start = time.perf_counter()
            cycle()
            seconds.append(time.perf_counter() - start)
    return {
        "statements_per_cycle": (counter.count - before) / cycles,
        "ms_p50": 1000 * statistics.median(seconds),
        "ms_min": 1000 * min(seconds),
        "ms_max": 1000 * max(seconds),
    }


def alternate(
    arms: dict[str, Callable[[], None]], counter: StatementCounter, cycles: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Measure every arm ``repeats`` times, the order alternating; per arm the medians and spread."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for repeat in range(repeats):
        order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
        for name in order:
            results[name].append(measure(arms[name], counter, cycles))
    return {
        name: {
            "statements_per_cycle": statistics.median(r["statements_per_cycle"] for r in runs),
            "ms_p50_median": statistics.median(r["ms_p50"] for r in runs),
            "ms_p50_spread": [min(r["ms_p50"] for r in runs), max(r["ms_p50"] for r in runs)],
        }
        for name, runs in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--history", type=int, default=300, help="imported results before measuring")
    parser.add_argument(
        "--cycles", type=int, default=30, help="ask + report + tell cycles per arm and repeat"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with database(args.storage) as url:
        counter = StatementCounter(make_url(url).database)
        arms = {"caviar": caviar_arm(url, args.history), "optuna": optuna_arm(url, args.history)}
        summary = alternate(arms, counter, args.cycles, args.repeats)
    print(
        json.dumps(
            {
                "benchmark": "sql_statements",
                "storage": args.storage,
                "history": args.history,
                "cycles": args.cycles,
                "repeats": args.repeats,
                **summary,
                "statements_ratio": summary["caviar"]["statements_per_cycle"]
                / summary["optuna"]["statements_per_cycle"],
            }
        )
    )


if __name__ == "__main__":
    main()
