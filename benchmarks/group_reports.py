"""Benchmark: a fused group's reports, one request per member against one batch per epoch.

A fused group of K trials reports every member's value after every epoch. Two arms, on the same
server and study, alternating per round:

* ``single`` (the worker before batches): K ``POST .../trials/{n}/report`` per epoch, one after
  another, as a worker's training loop sends them;
* ``batch``: one ``POST .../trials/reports`` per epoch carrying the K values in the same order.

Each arm has its own study with caviar's default pruner (``asha``: successive halving, which rates
a trial at its rungs once the study has a complete trial, reading the study's history there). A
round asks K trials and reports up to ``--epochs`` epochs of made-up curves (member m's value
rises with m and with the round, so later rounds have members to prune); a member the pruner
stops reports no more. The members are told (pruned or complete) after the clock stops. Measured
per member-epoch: the client's wall time (what the training loop waits) and the server's CPU time
(user + system of the ``caviar serve`` process group, from /proc). ``caviar serve`` runs one
process on a fresh PostgreSQL database (dropped afterwards). Prints one JSON line per round and a
summary with medians (min, max).

    python benchmarks/group_reports.py [--members 8] [--epochs 15] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.service_throughput import group_cpu_s, spread  # noqa: E402
from benchmarks.sql_statements import database  # noqa: E402
from caviar.service import processes  # noqa: E402


def definition(name: str) -> dict[str, Any]:
    """An external study that names no pruner (so it gets ``asha``)."""
    return {
        "name": name,
        "direction": "maximize",
        "search_space": {
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "scale": "log"},
            "dropout": {"type": "float", "low": 0.0, "high": 0.6},
        },
        "objective": {"kind": "external"},
        "sampler": {"type": "random", "seed": 0},
        "budget": {"n_trials": 1_000_000},
    }


def run_round(
    http: httpx.Client, study: str, arm: str, members: int, epochs: int, pid: int, level: float
) -> dict[str, Any]:
    """Ask ``members`` trials, report up to ``epochs`` epochs of them in the arm's way (a pruned
    member is told pruned and reports no more), tell the rest complete."""
    numbers = [
        http.post(f"/api/v1/studies/{study}/trials/ask", json={"worker_id": "bench"})
        .raise_for_status()
        .json()["number"]
        for _ in range(members)
    ]
    cpu, start = group_cpu_s(pid), time.perf_counter()
    live = dict.fromkeys(numbers, 0.0)  # number -> last value, while the pruner lets it train
    sent, pruned = 0, []
    for step in range(epochs):
        values = [(n, level + 0.05 * m + 0.01 * step) for m, n in enumerate(numbers) if n in live]
        sent += len(values)
        if arm == "single":
            answers = [
                http.post(
                    f"/api/v1/studies/{study}/trials/{number}/report",
                    json={"step": step, "value": value, "worker_id": "bench"},
                )
                .raise_for_status()
                .json()["should_prune"]
                for number, value in values
            ]
        else:
            reports = [{"number": n, "step": step, "value": v} for n, v in values]
            answer = http.post(
                f"/api/v1/studies/{study}/trials/reports", json={"reports": reports, "worker_id": "bench"}
            )
            answers = [r["should_prune"] for r in answer.raise_for_status().json()["results"]]
        for (number, value), prune in zip(values, answers, strict=True):
            live[number] = value
            if prune:
                pruned.append(number)
                del live[number]
    wall, server_cpu = time.perf_counter() - start, group_cpu_s(pid) - cpu
    for number in pruned:  # told after the clock stops: what is timed is the reports alone
        http.post(f"/api/v1/studies/{study}/trials/{number}/tell", json={"state": "pruned"})
    for number, value in live.items():
        http.post(f"/api/v1/studies/{study}/trials/{number}/tell", json={"state": "complete", "value": value})
    return {
        "arm": arm,
        "pruned": len(pruned),
        "member_epochs": sent,
        "wall_ms_per_member_epoch": round(1000 * wall / sent, 3),
        "server_cpu_ms_per_member_epoch": round(1000 * server_cpu / sent, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=8, help="K, the fused group's size")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=5, help="rounds of both arms (alternating order)")
    parser.add_argument("--quick", action="store_true", help="4 members, 4 epochs, 1 round (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.members, args.epochs, args.repeat = 4, 4, 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a timeout still stops the server

    rounds: dict[str, list[dict[str, Any]]] = {"single": [], "batch": []}
    with database("postgres") as url:  # a fresh migrated database, dropped afterwards
        server, base = processes.serve(url, processes=1, log="caviar-bench-serve.log")
        with server, httpx.Client(base_url=base, timeout=60) as http:
            for arm in rounds:
                http.post("/api/v1/studies", json=definition(f"reports-{arm}")).raise_for_status()
            for repeat in range(args.repeat + 1):  # round 0 warms the server up and is not counted
                order = ("single", "batch") if repeat % 2 == 0 else ("batch", "single")
                for arm in order:
                    level = 0.1 + 0.02 * repeat
                    study = f"reports-{arm}"
                    result = run_round(http, study, arm, args.members, args.epochs, server.pid, level)
                    line = {"result": "round", "repeat": repeat, "warm_up": repeat == 0, **result}
                    print(json.dumps(line), flush=True)
                    if repeat:
                        rounds[arm].append(result)
    single, batch = rounds["single"], rounds["batch"]

    def ratio(key: str) -> dict[str, float]:
        return spread([s[key] / b[key] for s, b in zip(single, batch, strict=True)])

    summary = {
        "result": "summary",
        "members": args.members,
        "epochs": args.epochs,
        "repeat": args.repeat,
        "database": "postgresql",
        "server_processes": 1,
        "single_wall_ms_per_member_epoch": spread([r["wall_ms_per_member_epoch"] for r in single]),
        "batch_wall_ms_per_member_epoch": spread([r["wall_ms_per_member_epoch"] for r in batch]),
        "wall_single_over_batch": ratio("wall_ms_per_member_epoch"),
        "single_server_cpu_ms_per_member_epoch": spread(
            [r["server_cpu_ms_per_member_epoch"] for r in single]
        ),
        "batch_server_cpu_ms_per_member_epoch": spread([r["server_cpu_ms_per_member_epoch"] for r in batch]),
        "server_cpu_single_over_batch": ratio("server_cpu_ms_per_member_epoch"),
        "median_pruned_per_round": {
            arm: statistics.median(r["pruned"] for r in results) for arm, results in rounds.items()
        },
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
