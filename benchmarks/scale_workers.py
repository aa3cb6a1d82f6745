"""Benchmark: 1,000 workers on one deployment whose database pools hold at most 20 connections.

``--workers`` simulated workers (asyncio clients in one process, on this machine) each register,
claim a running trial of one study, then for ``--seconds`` renew their lease with the one-call
heartbeat (``POST /api/v1/workers/{id}/heartbeat``) every heartbeat interval and report an
intermediate value every ``--report-every`` seconds, and finally tell. The service is
``caviar serve --processes P`` (``--processes``, default 2) on PostgreSQL with ``CAVIAR_DB_POOL_SIZE``
and ``CAVIAR_LEASE_POOL_SIZE`` (2) chosen so the P processes open at most ``--max-connections``
connections in all (P x (2 x pool + lease pool + 4)).

The simulated workers use aiohttp, not httpx: measured on this machine, an httpx ``AsyncClient``
request costs its caller 3.3-3.8 ms of CPU and an aiohttp one 0.21-0.27 ms (3,000 POSTs, 100 at
once, one server process). With httpx, one simulator process saturated its core at about 300
requests a second, and its own backlog (seconds, then tens of seconds) was what the latencies
measured while the server sat 20-40% busy. Each simulated worker has its own connection
(``--connections``, default one per worker), as a real worker has.

A run that cannot finish still says how far it got: every ``--progress`` seconds one JSON line
(``"result": "progress"``) gives the workers up, asks served, leases lost, heartbeat and report
p50/p99 so far, errors and the connections PostgreSQL sees; the final line is printed even when the
run is interrupted (Ctrl-C, a timeout's SIGTERM). ``--clients-core N`` runs the simulated clients
in a process of their own (its own process group) pinned to core N, and the server on the other
cores, so the server's share of the machine is known.

Targets (issue "Speed"): no lease lost, heartbeat p99 < 500 ms, report p99 < 1 s, no error; the
connections PostgreSQL actually saw (``pg_stat_activity``, sampled every second) are printed.
Baseline side by side: raw Optuna would hold one connection per worker process (1,000).

    python benchmarks/scale_workers.py [--workers 1000] [--seconds 120] [--heartbeat 10] \
        [--processes 2] [--max-connections 20] [--progress 10] [--clients-core 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from caviar import storage  # noqa: E402
from caviar.service import processes  # noqa: E402

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LEASE_POOL = 2
"""Connections each server process keeps for lease renewals (``CAVIAR_LEASE_POOL_SIZE``)."""


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
        self.up = 0  # workers registered
        self.asks_served = 0
        self.asks_deferred = 0  # 429 too_many_asks answers, retried after Retry-After as caviar's client does
        self.last_ask_s: float | None = None  # since the start, when the latest ask was answered
        self.started = time.monotonic()

    def progress(self, connections: int | None) -> dict[str, Any]:
        """How far the run got: one line, printable at any moment."""
        return {
            "result": "progress",
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "workers_up": self.up,
            "asks_served": self.asks_served,
            "asks_deferred_429": self.asks_deferred,
            "last_ask_served_at_s": self.last_ask_s,
            "leases_lost": self.lost,
            "errors": len(self.errors),
            "heartbeat": self.summary("heartbeat"),
            "report": self.summary("report"),
            "pg_connections_now": connections,
        }

    def totals(self) -> dict[str, Any]:
        """Everything the final result needs (sent back from the clients' process)."""
        return {
            "lost": self.lost,
            "errors": self.errors,
            "up": self.up,
            "asks_served": self.asks_served,
            "asks_deferred": self.asks_deferred,
            "last_ask_s": self.last_ask_s,
            "summaries": {name: self.summary(name) for name in self.latency},
        }

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


class Answer:
    """A response, read whole (aiohttp's is only readable inside its request's context)."""

    def __init__(self, status_code: int, headers: Any, text: str) -> None:
        self.status_code, self.headers, self.text = status_code, headers, text

    def json(self) -> Any:
        return json.loads(self.text)


async def timed(
    stats: Stats, kind: str, client: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> Answer | None:
    """POST ``body`` to ``path``; the latency and the outcome go to ``stats``."""
    start = time.perf_counter()
    try:
        async with client.post(path, json=body) as raw:
            response = Answer(raw.status, raw.headers, await raw.text())
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.errors.append(f"{kind}: {type(exc).__name__}")
        return None
    stats.latency[kind].append(time.perf_counter() - start)
    if response.status_code == 429:  # admission: not an error, the caller retries after Retry-After
        stats.asks_deferred += 1
    elif response.status_code >= 400:
        if response.status_code == 409 and "lease_lost" in response.text:
            stats.lost += 1
        else:
            stats.errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
    return response


async def worker(
    index: int,
    client: aiohttp.ClientSession,
    stats: Stats,
    args: argparse.Namespace,
    heartbeat_s: float,
    stop_at: float,
) -> None:
    worker_id = f"sim-{index}"
    await asyncio.sleep(random.uniform(0, args.ramp))  # workers arrive over the ramp-up
    registered = await timed(
        stats,
        "heartbeat",
        client,
        "/api/v1/workers",
        {"id": worker_id, "host": "bench", "pid": index, "device": "cpu"},
    )
    if registered is not None and registered.status_code < 400:
        stats.up += 1
    request_id = uuid.uuid4().hex  # the same for every retry of this ask (idempotent)
    while True:
        response = await timed(
            stats,
            "ask",
            client,
            "/api/v1/studies/scale/trials/ask",
            {"worker_id": worker_id, "request_id": request_id},
        )
        if response is None or response.status_code != 429 or time.monotonic() >= stop_at:
            break
        # a server process runs a bounded number of asks: wait Retry-After (spread), as caviar's client does
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")) * (1 + 0.25 * random.random()))
    if response is None or response.status_code != 200:
        return
    stats.asks_served += 1
    stats.last_ask_s = round(time.monotonic() - stats.started, 1)
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
                client,
                f"/api/v1/workers/{worker_id}/heartbeat",
                {"status": "busy", "trials": ref},
            )
            if beat is not None and beat.status_code == 200:
                stats.lost += len(beat.json()["lost"])
        if now >= next_report:
            next_report += args.report_every
            await timed(
                stats,
                "report",
                client,
                f"/api/v1/studies/scale/trials/{number}/report",
                {"step": step, "value": random.random(), "worker_id": worker_id},
            )
            step += 1
        await asyncio.sleep(max(0.0, min(next_beat, next_report) - time.monotonic()))
    await timed(
        stats,
        "tell",
        client,
        f"/api/v1/studies/scale/trials/{number}/tell",
        {"state": "complete", "value": random.random(), "worker_id": worker_id},
    )


async def report_progress(stats: Stats, every_s: float, connections: Any) -> None:
    """Print :meth:`Stats.progress` every ``every_s`` seconds until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        print(json.dumps(stats.progress(connections.value if connections.value >= 0 else None)), flush=True)


async def drive(base: str, args: argparse.Namespace, stats: Stats, connections: Any) -> None:
    connector = aiohttp.TCPConnector(limit=args.connections or args.workers)
    progress = asyncio.create_task(report_progress(stats, args.progress, connections))
    try:
        async with aiohttp.ClientSession(
            base_url=base, connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as client:
            stop_at = time.monotonic() + args.ramp + args.seconds
            await asyncio.gather(
                *(worker(i, client, stats, args, args.heartbeat, stop_at) for i in range(args.workers))
            )
    finally:
        progress.cancel()


def run_clients(base: str, args: argparse.Namespace, connections: Any, out: Any) -> None:
    """The simulated workers; in the clients' own process (``--clients-core``) or in this one.

    Whatever ends the run (the end, an error, SIGTERM or Ctrl-C), the totals so far go to ``out``.
    """
    if args.clients_core is not None:
        os.setpgid(0, 0)  # a process group of its own
        os.sched_setaffinity(0, {args.clients_core})
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    stats = Stats()
    try:
        asyncio.run(drive(base, args, stats, connections))
    except KeyboardInterrupt:
        stats.errors.append("interrupted")
    finally:
        out.put(stats.totals())


def pin_group(pgid: int, cores: set[int]) -> None:
    """Pin every live process of process group ``pgid`` (the server and its workers) to ``cores``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                data = handle.read()
            if int(data[data.rindex(")") + 2 :].split()[2]) == pgid:
                os.sched_setaffinity(int(entry), cores)
        except (OSError, ValueError):
            continue  # gone meanwhile


def watch_connections(database: str, samples: list[int], stop: threading.Event, now: Any) -> None:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        while not stop.wait(1.0):
            count = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db"), {"db": database}
            ).scalar_one()
            samples.append(int(count))
            now.value = int(count)
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
    parser.add_argument(
        "--connections", type=int, default=0, help="HTTP connections of the simulator (0: one per worker)"
    )
    parser.add_argument("--processes", type=int, default=2, help="API processes (caviar serve --processes)")
    parser.add_argument("--progress", type=float, default=10, help="seconds between progress lines")
    parser.add_argument(
        "--clients-core",
        type=int,
        default=None,
        help="run the clients in their own process group pinned to this core (the server on the others)",
    )
    parser.add_argument("--quick", action="store_true", help="100 workers, 20 s")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.seconds, args.ramp = 100, 20, 5
    # per process: 2 x pool (pool and overflow) + the lease pool + Optuna's 4
    pool = max(1, (args.max_connections // args.processes - 4 - LEASE_POOL) // 2)
    name = f"caviar_scale_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    samples: list[int] = []
    stop = threading.Event()
    ctx = multiprocessing.get_context("spawn")
    connections = ctx.Value("i", -1)  # the latest sample, for the progress lines
    totals: dict[str, Any] = {}
    final: Any = None
    started = time.monotonic()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a timeout still gets the last line
    try:
        storage.upgrade(url)
        env = {
            "CAVIAR_HEARTBEAT_INTERVAL_S": str(args.heartbeat),
            "CAVIAR_DB_POOL_SIZE": str(pool),
            "CAVIAR_LEASE_POOL_SIZE": str(LEASE_POOL),
        }
        server, base = processes.serve(url, processes=args.processes, env=env, log="caviar-scale-serve.log")
        with server:
            if args.clients_core is not None:
                others = set(os.sched_getaffinity(0)) - {args.clients_core}
                pin_group(server.pid, others or {args.clients_core})
            httpx.post(
                f"{base}/api/v1/studies", json=definition(args.workers + 10), timeout=60
            ).raise_for_status()
            watcher = threading.Thread(
                target=watch_connections, args=(name, samples, stop, connections), daemon=True
            )
            watcher.start()
            started = time.monotonic()
            queue = ctx.Queue()
            if args.clients_core is None:
                run_clients(base, args, connections, queue)
            else:
                clients = ctx.Process(target=run_clients, args=(base, args, connections, queue))
                clients.start()
                try:
                    clients.join()
                except KeyboardInterrupt:
                    if clients.pid is not None:
                        os.killpg(clients.pid, signal.SIGTERM)
                    clients.join(30)
            totals = queue.get(timeout=60)
            stop.set()
            watcher.join(5)
            final = httpx.get(f"{base}/api/v1/studies/scale", timeout=60).json()["trial_counts"]
    except KeyboardInterrupt:
        totals.setdefault("errors", []).append("interrupted before the end")
    finally:
        stop.set()
        storage.reset_optuna_storages()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    elapsed = time.monotonic() - started
    errors: list[str] = totals.get("errors", [])
    summaries = totals.get("summaries", {})
    lost = totals.get("lost", 0)
    heartbeat = summaries.get("heartbeat", {})
    report = summaries.get("report", {})
    result = {
        "result": "scale",
        "workers": args.workers,
        "seconds": round(elapsed, 1),
        "heartbeat_interval_s": args.heartbeat,
        "report_every_s": args.report_every,
        "server_processes": args.processes,
        "clients_core": args.clients_core,
        "cpus": sorted(os.sched_getaffinity(0)),
        "db_pool_size_per_process": pool,
        "pg_connections_max": max(samples, default=None),
        "pg_connections_median": statistics.median(samples) if samples else None,
        "raw_optuna_connections": args.workers,  # the baseline: one storage (connection) per worker process
        "workers_up": totals.get("up"),
        "asks_served": totals.get("asks_served"),
        "asks_deferred_429": totals.get("asks_deferred"),
        "last_ask_served_at_s": totals.get("last_ask_s"),
        "leases_lost": lost,
        "errors": len(errors),
        "error_examples": errors[:5],
        **summaries,
        "final_counts": final,
        "targets_met": {
            "no_lease_lost": lost == 0,
            "heartbeat_p99_under_500ms": (heartbeat.get("p99_ms") or 1e9) < 500,
            "report_p99_under_1s": (report.get("p99_ms") or 1e9) < 1000,
            "no_errors": not errors,
            "at_most_max_connections": max(samples, default=0) <= args.max_connections,
            "all_asks_served_within_60s": totals.get("asks_served") == args.workers
            and (totals.get("last_ask_s") or 1e9) <= 60,
        },
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
