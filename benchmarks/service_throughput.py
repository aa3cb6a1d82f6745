"""REST ask + tell throughput of ``caviar serve`` against raw Optuna clients, on one PostgreSQL.

C client processes loop ask + tell for a fixed time, (a) over REST against a running
``caviar serve --processes N``, (b) with raw Optuna (``optuna.load_study`` on RDBStorage, the same
TPE defaults and search space, the same number of client processes) on the same database server.
Each of ``--repeat`` rounds runs both arms on fresh studies, in alternating order (REST first in
even rounds, raw Optuna first in odd ones), so drift on a shared machine hits both; the summary
gives medians over rounds with min and max, and the ratio of each round. CPU is measured too: the
server's (every process of its process group, from /proc) per trial it served, and the clients'
(``time.process_time`` around each client's loop) per trial, for both arms. Then single-client ask
latency is measured at 100, 1,000 and 5,000 trials of history for both (arms alternating per ask),
and the SQL statements per ask + report + tell of both (``benchmarks/sql_statements.py``, in this
process, on the same server). Prints one JSON object per result and a final summary.

    python benchmarks/service_throughput.py [--clients 8] [--seconds 20] [--processes 2] [--repeat 3]
    python benchmarks/service_throughput.py --quick     # smoke test: 4 clients, 5 s, 1 round
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import optuna
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from caviar.service import processes  # noqa: E402

SPACE: dict[str, Any] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "scale": "log"},
    "beta1": {"type": "float", "low": 0.8, "high": 0.999, "scale": "reverse_log"},
    "dropout": {"type": "float", "low": 0.0, "high": 0.6},
}


def objective_value(params: dict[str, float]) -> float:
    """A cheap synthetic objective: the benchmark measures the service, not training."""
    return -((np.log10(params["lr"]) + 2.5) ** 2) - (params["dropout"] - 0.2) ** 2


def definition(name: str, n_trials: int) -> dict[str, Any]:
    return {
        "name": name,
        "direction": "maximize",
        "search_space": SPACE,
        "objective": {"kind": "external"},
        "sampler": {"type": "tpe"},
        "pruner": {"type": "none"},
        "budget": {"n_trials": n_trials},
    }


def raw_suggest(trial: optuna.Trial) -> dict[str, float]:
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    one_minus = trial.suggest_float("one_minus_beta1", 1 - 0.999, 1 - 0.8, log=True)
    dropout = trial.suggest_float("dropout", 0.0, 0.6)
    return {"lr": lr, "beta1": 1 - one_minus, "dropout": dropout}


# ---- client loops (one process each) -------------------------------------------------------


def rest_client(base: str, name: str, seconds: float, out: Any) -> None:
    """Ask + tell until ``seconds`` are up; an ask refused 429/503 waits its ``Retry-After`` and asks
    again, as caviar's client does (the refusals and the time spent waiting are counted)."""
    latencies: list[tuple[float, float]] = []
    refused, waited = 0, 0.0
    cpu = time.process_time()
    with httpx.Client(base_url=base, timeout=60) as client:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            response = client.post(f"/api/v1/studies/{name}/trials/ask", json={})
            t1 = time.perf_counter()
            if response.status_code in (429, 503):
                refused += 1
                pause = min(float(response.headers.get("Retry-After", 1)), max(0.0, deadline - t1))
                waited += pause
                time.sleep(pause)
                continue
            response.raise_for_status()
            assignment = response.json()
            value = objective_value(assignment["params"])
            client.post(
                f"/api/v1/studies/{name}/trials/{assignment['number']}/tell",
                json={"state": "complete", "value": value},
            ).raise_for_status()
            latencies.append((t1 - t0, time.perf_counter() - t0))
    out.put((latencies, time.process_time() - cpu, refused, waited))


def raw_client(url: str, name: str, seconds: float, out: Any) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=url, sampler=optuna.samplers.TPESampler())
    latencies: list[tuple[float, float]] = []
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        trial = study.ask()
        params = raw_suggest(trial)
        t1 = time.perf_counter()
        study.tell(trial, objective_value(params))
        latencies.append((t1 - t0, time.perf_counter() - t0))
    out.put((latencies, time.process_time() - cpu, 0, 0.0))


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                data = handle.read()
        except OSError:
            continue  # gone meanwhile
        fields = data[data.rindex(")") + 2 :].split()  # from the state on: pgrp is [2], utime/stime [11]/[12]
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def run_clients(
    target: Any, args: tuple[Any, ...], clients: int, seconds: float, server_pgid: int | None = None
) -> dict[str, float | None]:
    """Run ``clients`` client processes for ``seconds``; throughput, latency and CPU per trial."""
    server_cpu = group_cpu_s(server_pgid) if server_pgid is not None else 0.0
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=target, args=(*args, seconds, queue)) for _ in range(clients)]
    start = time.perf_counter()
    for process in processes:
        process.start()
    answers = [queue.get(timeout=seconds + 600) for _ in processes]
    results, cpus, refusals, waits = zip(*answers, strict=True)
    client_cpu = sum(cpus)  # the loops' own CPU (no interpreter start-up)
    wall = time.perf_counter() - start
    for process in processes:
        process.join(30)
    server_cpu = group_cpu_s(server_pgid) - server_cpu if server_pgid is not None else 0.0
    asks = np.array([a for result in results for a, _ in result])
    total = np.array([t for result in results for _, t in result])
    n = len(total)
    return {
        "trials": n,
        "trials_per_s": n / seconds,
        "wall_s": wall,
        "ask_p50_ms": float(np.percentile(asks, 50) * 1e3) if n else float("nan"),
        "ask_p99_ms": float(np.percentile(asks, 99) * 1e3) if n else float("nan"),
        "ask_tell_p50_ms": float(np.percentile(total, 50) * 1e3) if n else float("nan"),
        "ask_tell_p99_ms": float(np.percentile(total, 99) * 1e3) if n else float("nan"),
        "server_cpu_ms_per_trial": 1e3 * server_cpu / n if n and server_pgid is not None else None,
        "client_cpu_ms_per_trial": 1e3 * client_cpu / n if n else float("nan"),
        "asks_refused": sum(refusals),
        "client_s_waiting_retry_after": sum(waits),
    }


# ---- history latency -----------------------------------------------------------------------


def add_history(url: str, name: str, n: int, seed: int = 0) -> None:
    """Give a study ``n`` complete trials (through Optuna's storage API, in bulk)."""
    rng = np.random.default_rng(seed)
    dists: dict[str, optuna.distributions.BaseDistribution] = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "one_minus_beta1": optuna.distributions.FloatDistribution(0.001, 0.2, log=True),
        "dropout": optuna.distributions.FloatDistribution(0.0, 0.6),
    }
    study = optuna.load_study(study_name=name, storage=url)
    trials = []
    for _ in range(n):
        params = {
            "lr": float(10 ** rng.uniform(-4, -1)),
            "one_minus_beta1": float(np.exp(rng.uniform(np.log(0.001), np.log(0.2)))),
            "dropout": float(rng.uniform(0, 0.6)),
        }
        value = objective_value({"lr": params["lr"], "dropout": params["dropout"]})
        trials.append(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    study.add_trials(trials)


def history_latency(base: str, url: str, sizes: list[int], asks: int) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for size in sizes:
            name = f"hist-{size}-{uuid.uuid4().hex[:6]}"
            client.post("/api/v1/studies", json=definition(name, size + asks + 10)).raise_for_status()
            add_history(url, name, size)
            raw_name = f"raw-{name}"
            optuna.create_study(study_name=raw_name, storage=url, direction="maximize")
            add_history(url, raw_name, size)
            rest: list[float] = []
            raw: list[float] = []
            study = optuna.load_study(study_name=raw_name, storage=url, sampler=optuna.samplers.TPESampler())
            for i in range(2 * asks):  # the arms alternate ask by ask, starting with each in turn
                if (i % 2 == 0) == (i // 2 % 2 == 0):
                    t0 = time.perf_counter()
                    assignment = client.post(f"/api/v1/studies/{name}/trials/ask", json={}).json()
                    rest.append(time.perf_counter() - t0)
                    client.post(
                        f"/api/v1/studies/{name}/trials/{assignment['number']}/tell",
                        json={"state": "complete", "value": objective_value(assignment["params"])},
                    )
                else:
                    t0 = time.perf_counter()
                    trial = study.ask()
                    params = raw_suggest(trial)
                    raw.append(time.perf_counter() - t0)
                    study.tell(trial, objective_value(params))
            rows.append(
                {
                    "result": "ask_latency_vs_history",
                    "history": size,
                    "service_ask_p50_ms": float(np.percentile(rest, 50) * 1e3),
                    "service_ask_p99_ms": float(np.percentile(rest, 99) * 1e3),
                    "raw_optuna_ask_p50_ms": float(np.percentile(raw, 50) * 1e3),
                    "raw_optuna_ask_p99_ms": float(np.percentile(raw, 99) * 1e3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def count_statements(url: str, cycles: int) -> dict[str, float]:
    """SQL statements per ask + report + tell, caviar's REST path and raw Optuna (see sql_statements)."""
    from benchmarks import sql_statements  # lazy: it imports this module (the study definition)

    counter = sql_statements.StatementCounter(make_url(url).database)
    arms = {"caviar": sql_statements.caviar_arm(url, 100), "optuna": sql_statements.optuna_arm(url, 100)}
    result = sql_statements.alternate(arms, counter, cycles, 2)
    return {arm: result[arm]["statements_per_cycle"] for arm in arms}


# ---- orchestration -------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max (rounded)."""
    return {
        "median": round(float(np.median(values)), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--processes", type=int, default=2, help="caviar serve processes")
    parser.add_argument("--port", type=int, default=18555)
    parser.add_argument("--history", default="100,1000,5000")
    parser.add_argument("--history-asks", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of both arms (alternating order)")
    parser.add_argument(
        "--statement-cycles", type=int, default=10, help="ask+report+tell cycles counted (0: skip)"
    )
    parser.add_argument("--quick", action="store_true", help="4 clients, 5 s, 1 round, history 100,1000")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.history, args.history_asks = 4, 5.0, "100,1000", 10
        args.repeat = 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a timeout still stops the server

    from caviar import storage

    db_name = f"caviar_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    url = make_url(args.admin_url).set(database=db_name).render_as_string(hide_password=False)
    storage.upgrade(url)
    server, base = processes.serve(
        url, port=args.port, processes=args.processes, log="caviar-bench-serve.log"
    )
    try:
        config = {"clients": args.clients, "seconds": args.seconds, "server_processes": args.processes,
                  "cpus": os.cpu_count(), "database": "postgresql", "optuna": optuna.__version__}  # fmt: skip
        rounds: dict[str, list[dict[str, Any]]] = {"caviar_rest": [], "raw_optuna": []}
        for repeat in range(args.repeat):
            order = ("caviar_rest", "raw_optuna") if repeat % 2 == 0 else ("raw_optuna", "caviar_rest")
            for arm in order:
                name = f"bench-{arm}-{repeat}"
                if arm == "caviar_rest":
                    httpx.post(
                        f"{base}/api/v1/studies", json=definition(name, 1_000_000), timeout=30
                    ).raise_for_status()
                    result = run_clients(rest_client, (base, name), args.clients, args.seconds, server.pid)
                else:
                    optuna.create_study(study_name=name, storage=url, direction="maximize")
                    result = run_clients(raw_client, (url, name), args.clients, args.seconds)
                line = {"result": "throughput", "arm": arm, "repeat": repeat, "position": order.index(arm)}
                line.update(config, **result)
                print(json.dumps(line), flush=True)
                rounds[arm].append(result)
        sizes = [int(s) for s in args.history.split(",") if s]
        history = history_latency(base, url, sizes, args.history_asks)
        statements = count_statements(url, args.statement_cycles) if args.statement_cycles else None
        service, raw = rounds["caviar_rest"], rounds["raw_optuna"]
        summary = {
            "result": "summary",
            **config,
            "repeat": args.repeat,
            "order": "alternating per round (REST first in even rounds)",
            "service_trials_per_s": spread([r["trials_per_s"] for r in service]),
            "raw_optuna_trials_per_s": spread([r["trials_per_s"] for r in raw]),
            "throughput_ratio": spread(
                [a["trials_per_s"] / b["trials_per_s"] for a, b in zip(service, raw, strict=True)]
            ),
            "service_ask_p50_ms": spread([r["ask_p50_ms"] for r in service]),
            "raw_ask_p50_ms": spread([r["ask_p50_ms"] for r in raw]),
            "service_ask_p99_ms": spread([r["ask_p99_ms"] for r in service]),
            "raw_ask_p99_ms": spread([r["ask_p99_ms"] for r in raw]),
            "service_server_cpu_ms_per_trial": spread([r["server_cpu_ms_per_trial"] for r in service]),
            "service_client_cpu_ms_per_trial": spread([r["client_cpu_ms_per_trial"] for r in service]),
            "raw_client_cpu_ms_per_trial": spread([r["client_cpu_ms_per_trial"] for r in raw]),
            "service_total_cpu_ms_per_trial": spread(
                [r["server_cpu_ms_per_trial"] + r["client_cpu_ms_per_trial"] for r in service]
            ),
            "statements_per_ask_report_tell": statements,
            "ask_ms_by_history": {
                str(row["history"]): {
                    "service_p50": row["service_ask_p50_ms"],
                    "raw_p50": row["raw_optuna_ask_p50_ms"],
                    "service_p99": row["service_ask_p99_ms"],
                    "raw_p99": row["raw_optuna_ask_p99_ms"],
                }
                for row in history
            },
        }
        print(json.dumps(summary), flush=True)
    finally:
        server.stop(30)
        storage.reset_optuna_storages()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
