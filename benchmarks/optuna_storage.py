"""SQL statements and latency of one ``study.optimize`` trial: through ``caviar.optuna_storage``
against raw Optuna on the same database.

Both arms run the same objective (three ``suggest_float``, one ``report``, ``should_prune``) with a
seeded TPE sampler on studies with the same history of complete trials: (a) Optuna with caviar's
storage, talking over HTTP to a caviar service running in this process (uvicorn in a thread, so
its statements are counted), (b) Optuna with its RDB storage on the database directly. Every SQL
statement of either arm is counted with a SQLAlchemy event (:class:`StatementCounter`); the arms
alternate per repeat. Prints one JSON object.

    python benchmarks/optuna_storage.py [--storage sqlite|postgres] [--history 100] [--cycles 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import uvicorn
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

import caviar  # noqa: E402
from benchmarks.sql_statements import StatementCounter, alternate, database, seeded_study  # noqa: E402
from caviar.service.api import create_app  # noqa: E402
from caviar.service.config import Settings  # noqa: E402
from caviar.service.db import Database  # noqa: E402


def objective(trial: optuna.Trial) -> float:
    """The same three parameters as :func:`benchmarks.sql_statements.history`, one report."""
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_float("one_minus_beta1", 0.001, 0.2, log=True)
    trial.suggest_float("dropout", 0.0, 0.6)
    trial.report(0.5, 0)
    trial.should_prune()
    return 0.5


@contextlib.contextmanager
def service(url: str) -> Iterator[str]:
    """A caviar service on ``url`` in a thread of this process; its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    db = Database(url)
    app = create_app(Settings(database_url=url, background_tasks=False), db=db)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        db.dispose()


def arm(storage: optuna.storages.BaseStorage, n_history: int) -> Callable[[], None]:
    """One ``study.optimize(objective, n_trials=1)`` on a study with ``n_history`` results."""
    study = seeded_study(storage, "bench", n_history)
    return lambda: study.optimize(objective, n_trials=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--history", type=int, default=100, help="complete trials before measuring")
    parser.add_argument("--cycles", type=int, default=20, help="optimize trials per arm and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with database(args.storage) as url, service(url) as base:
        counter = StatementCounter(make_url(url).database)
        arms = {
            "caviar_storage": arm(caviar.optuna_storage(base), args.history),
            "optuna_rdb": arm(optuna.storages.RDBStorage(url), args.history),
        }
        summary = alternate(arms, counter, args.cycles, args.repeats)  # a cycle is one trial
    print(
        json.dumps(
            {
                "benchmark": "optuna_storage",
                "storage": args.storage,
                "history": args.history,
                "cycles": args.cycles,
                "repeats": args.repeats,
                **summary,
                "statements_ratio": summary["caviar_storage"]["statements_per_cycle"]
                / summary["optuna_rdb"]["statements_per_cycle"],
                "latency_ratio": summary["caviar_storage"]["ms_p50_median"]
                / summary["optuna_rdb"]["ms_p50_median"],
            }
        )
    )


if __name__ == "__main__":
    main()
