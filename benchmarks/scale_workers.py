"""Benchmark: 1,000 workers on one deployment whose database pools hold at most 20 connections.

``--workers`` simulated workers (asyncio clients in one process, on this machine) each register,
claim a running trial of one study, then for ``--seconds`` renew their lease with the one-call
heartbeat (``POST /api/v1/workers/{id}/heartbeat``) every heartbeat interval and report an
intermediate value every ``--report-every`` seconds, and finally tell. The service is
``caviar serve --processes 2`` on PostgreSQL with ``CAVIAR_DB_POOL_SIZE`` chosen so the two
processes open at most ``--max-connections`` connections in all (2 x (2 x pool + 4)).

Targets (issue "Speed"): no lease lost, heartbeat p99 < 500 ms, report p99 < 1 s, no error; the
connections PostgreSQL actually saw (``pg_stat_activity``, sampled every second) are printed.
Baseline side by side: raw Optuna would hold one connection per worker process (1,000).

    python benchmarks/scale_workers.py [--workers 1000] [--seconds 120] [--heartbeat 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from caviar import storage  # noqa: E402
from caviar.service import processes  # noqa: E402

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def definition(n_trials: int) -> dict[str, Any]:
    return {
        "name": "scale",
        "direction": "maximize",
        "search_space": {
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "scale": "log"},
            "beta1": {"type": "float", "low": 0.8, "high": 0.999, "scale": "reverse_log"},
        },
        "objective": {"kind": "external"},
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "budget": {"n_trials": n_trials},
    }


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {"ask": [], "heartbeat": [], "report": [], "tell": []}
        self.errors: list[str] = []
        self.lost = 0

    def summary(self, name: str) -> dict[str, float | int | None]:
        values = self.latency[name]
        if not values:
            return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        return {
            "count": len(values),
            "p50_ms": round(float(np.percentile(values, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(values, 99)) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1),
        }


async def timed(stats: Stats, kind: str, call: Any) -> httpx.Response | None:
    start = time.perf_counter()
    try:
        response: httpx.Response = await call
    except httpx.HTTPError as exc:
        stats.errors.append(f"{kind}: {type(exc).__name__}")
        return None
    stats.latency[kind].append(time.perf_counter() - start)
    if response.status_code >= 400:
        if response.status_code == 409 and "lease_lost" in response.text:
            stats.lost += 1
        else:
            stats.errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
    return response


async def worker(
    index: int,
    client: httpx.AsyncClient,
    stats: Stats,
    args: argparse.Namespace,
    heartbeat_s: float,
    stop_at: float,
) -> None:
    worker_id = f"sim-{index}"
    await asyncio.sleep(random.uniform(0, args.ramp))  # workers arrive over the ramp-up
    await timed(
        stats,
        "heartbeat",
        client.post(
            "/api/v1/workers", json={"id": worker_id, "host": "bench", "pid": index, "device": "cpu"}
        ),
    )
    response = await timed(
        stats,
        "ask",
        client.post(
            "/api/v1/studies/scale/trials/ask", json={"worker_id": worker_id, "request_id": uuid.uuid4().hex}
        ),
    )
    if response is None or response.status_code != 200:
        return
    number = response.json()["number"]
    ref = [{"study": "scale", "number": number}]
    next_beat = time.monotonic() + random.uniform(0, heartbeat_s)
    next_report = time.monotonic() + random.uniform(0, args.report_every)
    step = 0
    while time.monotonic() < stop_at:
        now = time.monotonic()
        if now >= next_beat:
            next_beat += heartbeat_s
            beat = await timed(
                stats,
                "heartbeat",
                client.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"status": "busy", "trials": ref}),
            )
            if beat is not None and beat.status_code == 200:
                stats.lost += len(beat.json()["lost"])
        if now >= next_report:
            next_report += args.report_every
            await timed(
                stats,
                "report",
                client.post(
                    f"/api/v1/studies/scale/trials/{number}/report",
                    json={"step": step, "value": random.random(), "worker_id": worker_id},
                ),
            )
            step += 1
        await asyncio.sleep(max(0.0, min(next_beat, next_report) - time.monotonic()))
    await timed(
        stats,
        "tell",
        client.post(
            f"/api/v1/studies/scale/trials/{number}/tell",
            json={"state": "complete", "value": random.random(), "worker_id": worker_id},
        ),
    )


async def drive(base: str, args: argparse.Namespace, heartbeat_s: float) -> Stats:
    stats = Stats()
    limits = httpx.Limits(max_connections=args.connections, max_keepalive_connections=args.connections)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        stop_at = time.monotonic() + args.ramp + args.seconds
        await asyncio.gather(
            *(worker(i, client, stats, args, heartbeat_s, stop_at) for i in range(args.workers))
        )
    return stats


def watch_connections(database: str, samples: list[int], stop: threading.Event) -> None:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        while not stop.wait(1.0):
            count = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db"), {"db": database}
            ).scalar_one()
            samples.append(int(count))
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=120, help="steady state after the ramp-up")
    parser.add_argument("--ramp", type=float, default=30, help="workers arrive over this many seconds")
    parser.add_argument("--heartbeat", type=float, default=10, help="CAVIAR_HEARTBEAT_INTERVAL_S")
    parser.add_argument("--report-every", type=float, default=5)
    parser.add_argument(
        "--max-connections", type=int, default=20, help="database connections of both processes"
    )
    parser.add_argument("--connections", type=int, default=200, help="HTTP connections of the simulator")
    parser.add_argument("--quick", action="store_true", help="100 workers, 20 s")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.seconds, args.ramp = 100, 20, 5
    pool = max(1, (args.max_connections // 2 - 4) // 2)  # per process: 2 x pool + Optuna's 4
    name = f"caviar_scale_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    samples: list[int] = []
    stop = threading.Event()
    try:
        storage.upgrade(url)
        env = {"CAVIAR_HEARTBEAT_INTERVAL_S": str(args.heartbeat), "CAVIAR_DB_POOL_SIZE": str(pool)}
        server, base = processes.serve(url, processes=2, env=env, log="caviar-scale-serve.log")
        with server:
            httpx.post(
                f"{base}/api/v1/studies", json=definition(args.workers + 10), timeout=60
            ).raise_for_status()
            watcher = threading.Thread(target=watch_connections, args=(name, samples, stop), daemon=True)
            watcher.start()
            started = time.monotonic()
            stats = asyncio.run(drive(base, args, args.heartbeat))
            elapsed = time.monotonic() - started
            stop.set()
            watcher.join(5)
            final = httpx.get(f"{base}/api/v1/studies/scale", timeout=60).json()["trial_counts"]
    finally:
        stop.set()
        storage.reset_optuna_storages()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    result = {
        "result": "scale",
        "workers": args.workers,
        "seconds": round(elapsed, 1),
        "heartbeat_interval_s": args.heartbeat,
        "report_every_s": args.report_every,
        "server_processes": 2,
        "db_pool_size_per_process": pool,
        "pg_connections_max": max(samples, default=None),
        "pg_connections_median": statistics.median(samples) if samples else None,
        "raw_optuna_connections": args.workers,  # the baseline: one storage (connection) per worker process
        "leases_lost": stats.lost,
        "errors": len(stats.errors),
        "error_examples": stats.errors[:5],
        "ask": stats.summary("ask"),
        "heartbeat": stats.summary("heartbeat"),
        "report": stats.summary("report"),
        "tell": stats.summary("tell"),
        "final_counts": final,
        "targets_met": {
            "no_lease_lost": stats.lost == 0,
            "heartbeat_p99_under_500ms": (stats.summary("heartbeat")["p99_ms"] or 1e9) < 500,
            "report_p99_under_1s": (stats.summary("report")["p99_ms"] or 1e9) < 1000,
            "no_errors": not stats.errors,
            "at_most_max_connections": max(samples, default=0) <= args.max_connections,
        },
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
