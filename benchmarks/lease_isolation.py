"""Study B's heartbeats while study A imports 1,000 trials, and while A's asks each take long.

One server process (this script re-run with ``--serve``: the app with a sampler that sleeps
``--sampler-delay`` seconds for studies named ``slow-*``, standing in for a GP over a long
history). Study B has one running trial held by worker ``wB``; B's worker heartbeat and trial
heartbeat are timed in turn, every ``--beat-every`` seconds, through three phases of the same run:

1. ``idle``: nothing else runs (the baseline);
2. ``import``: study A imports 1,000 complete trials in one request;
3. ``slow_asks``: ``--askers`` threads ask study ``slow-a`` over and over, each ask sampling for
   ``--sampler-delay`` seconds (30 s in the full run, as in issue 22).

Prints one JSON object per phase (B's heartbeat p50/p99/max in ms, errors, leases lost, and what
A's work did) and a summary comparing each phase's p99 with the idle baseline.

    python benchmarks/lease_isolation.py                 # full: sampler 30 s, SQLite in a temp dir
    python benchmarks/lease_isolation.py --quick         # sampler 3 s, short phases
    python benchmarks/lease_isolation.py --database-url postgresql+psycopg://user@host/empty_db
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from caviar.service import processes  # noqa: E402

API = "/api/v1"
SPACE: dict[str, Any] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "scale": "log"},
    "dropout": {"type": "float", "low": 0.0, "high": 0.6},
}


def definition(name: str, n_trials: int = 100_000) -> dict[str, Any]:
    return {
        "name": name,
        "direction": "maximize",
        "search_space": SPACE,
        "objective": {"kind": "external"},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "budget": {"n_trials": n_trials},
    }


# ---- the server (``--serve``) ------------------------------------------------------------------


def serve(port: int, delay_s: float) -> None:
    """Run the app on ``port`` with a sampler that sleeps ``delay_s`` for studies named slow-*."""
    import uvicorn

    from caviar.service.api import create_app
    from caviar.service.config import Settings
    from caviar.service.trials import lifecycle

    real = lifecycle._sample

    def slow_sample(trial: Any, study_definition: Any) -> None:
        if trial.study.study_name.startswith("slow-"):
            time.sleep(delay_s)
        real(trial, study_definition)

    lifecycle._sample = slow_sample  # type: ignore[assignment]
    uvicorn.run(create_app(Settings()), host="127.0.0.1", port=port, log_level="warning")


# ---- the clients -------------------------------------------------------------------------------


class Beats:
    """Study B's heartbeats, timed, on a thread, until stopped."""

    def __init__(self, base: str, every_s: float) -> None:
        self.base, self.every_s = base, every_s
        self.worker_ms: list[float] = []
        self.trial_ms: list[float] = []
        self.errors = 0
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Beats:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        refs = {"trials": [{"study": "b", "number": 0}]}
        with httpx.Client(base_url=self.base, timeout=120) as http:
            while not self._stop.is_set():
                start = time.perf_counter()
                answer = http.post(f"{API}/workers/wB/heartbeat", json=refs)
                self.worker_ms.append((time.perf_counter() - start) * 1000)
                if answer.status_code != 200:
                    self.errors += 1
                elif answer.json()["lost"]:
                    self.lost += 1
                start = time.perf_counter()
                answer = http.post(f"{API}/studies/b/trials/0/heartbeat", json={"worker_id": "wB"})
                self.trial_ms.append((time.perf_counter() - start) * 1000)
                if answer.status_code == 409:
                    self.lost += 1
                elif answer.status_code != 204:
                    self.errors += 1
                self._stop.wait(self.every_s)

    def summary(self) -> dict[str, Any]:
        both = self.worker_ms + self.trial_ms

        def pct(values: list[float], q: float) -> float:
            return round(float(np.percentile(values, q)), 1) if values else float("nan")

        return {
            "beats": len(both),
            "p50_ms": pct(both, 50),
            "p99_ms": pct(both, 99),
            "max_ms": round(max(both), 1) if both else None,
            "worker_beat_p99_ms": pct(self.worker_ms, 99),
            "trial_beat_p99_ms": pct(self.trial_ms, 99),
            "errors": self.errors,
            "leases_lost": self.lost,
        }


def slow_askers(base: str, n: int, until: float) -> dict[str, int]:
    """``n`` threads asking study slow-a until ``until`` (monotonic); answers counted by status."""
    counts: dict[str, int] = {}
    guard = threading.Lock()

    def run(index: int) -> None:
        with httpx.Client(base_url=base, timeout=600) as http:
            while time.monotonic() < until:
                answer = http.post(f"{API}/studies/slow-a/trials/ask", json={"worker_id": f"a{index}"})
                with guard:
                    counts[str(answer.status_code)] = counts.get(str(answer.status_code), 0) + 1
                if answer.status_code in (429, 503):
                    time.sleep(
                        min(float(answer.headers.get("Retry-After", "1")), max(0.0, until - time.monotonic()))
                    )

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url", default=None, help="an empty database (default: SQLite in a temp dir)"
    )
    parser.add_argument("--sampler-delay", type=float, default=30.0, help="seconds each slow-a ask samples")
    parser.add_argument("--idle-s", type=float, default=20.0, help="length of the idle (baseline) phase")
    parser.add_argument("--askers", type=int, default=16, help="threads asking slow-a")
    parser.add_argument("--slow-phase-s", type=float, default=None, help="default: 2 x sampler delay")
    parser.add_argument("--import-trials", type=int, default=1000)
    parser.add_argument("--beat-every", type=float, default=0.05, help="pause between two of B's beats")
    parser.add_argument("--quick", action="store_true", help="sampler 3 s, idle 5 s")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.sampler_delay)
        return
    if args.quick:
        args.sampler_delay, args.idle_s = 3.0, 5.0
    slow_phase_s = args.slow_phase_s or 2 * args.sampler_delay

    from caviar import storage

    tmp = tempfile.TemporaryDirectory()
    url = args.database_url or f"sqlite:///{tmp.name}/caviar.db"
    storage.upgrade(url)
    port = processes.free_port(18000)
    env = {**os.environ, "CAVIAR_DATABASE_URL": url, "CAVIAR_HEARTBEAT_INTERVAL_S": "10"}
    env.pop("CAVIAR_API_TOKEN", None)  # loopback, no tokens
    log = open(Path(tmp.name) / "serve.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--sampler-delay", str(args.sampler_delay)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        processes.wait_until(lambda: _healthy(base), 60, "the server did not start")
        with httpx.Client(base_url=base, timeout=600) as http:
            for name in ("b", "imp-a", "slow-a"):
                http.post(f"{API}/studies", json=definition(name)).raise_for_status()
            http.post(
                f"{API}/workers", json={"id": "wB", "host": "bench", "pid": 1, "device": "cpu"}
            ).raise_for_status()
            http.post(f"{API}/studies/b/trials/ask", json={"worker_id": "wB"}).raise_for_status()
            settings = {"database": url.split(":")[0], "heartbeat_interval_s": 10, "cpus": os.cpu_count(),
                        "sampler_delay_s": args.sampler_delay, "askers": args.askers}  # fmt: skip
            results: dict[str, dict[str, Any]] = {}

            with Beats(base, args.beat_every) as beats:
                time.sleep(args.idle_s)
            results["idle"] = beats.summary()
            print(json.dumps({"phase": "idle", **settings, **results["idle"]}), flush=True)

            rng = np.random.default_rng(0)
            items = [
                {"params": {"lr": float(10 ** rng.uniform(-4, -1)), "dropout": float(rng.uniform(0, 0.6))},
                 "value": float(rng.normal())}
                for _ in range(args.import_trials)
            ]  # fmt: skip
            with Beats(base, args.beat_every) as beats:
                start = time.perf_counter()
                imported = http.post(f"{API}/studies/imp-a/trials/enqueue", json={"trials": items})
                import_s = time.perf_counter() - start
            results["import"] = beats.summary()
            done = {"import_s": round(import_s, 2), "import_status": imported.status_code}
            print(json.dumps({"phase": "import", **settings, **results["import"], **done}), flush=True)

            with Beats(base, args.beat_every) as beats:
                answers = slow_askers(base, args.askers, time.monotonic() + slow_phase_s)
            results["slow_asks"] = beats.summary()
            print(json.dumps({"phase": "slow_asks", **settings, **results["slow_asks"],
                              "phase_s": slow_phase_s, "ask_answers": answers}), flush=True)  # fmt: skip

        idle_p99 = results["idle"]["p99_ms"]
        summary = {
            "result": "summary",
            "baseline": "idle",
            **settings,
            **{f"{phase}_p99_ms": results[phase]["p99_ms"] for phase in results},
            **{f"{phase}_p99_vs_idle": round(results[phase]["p99_ms"] / idle_p99, 2) for phase in results},
            "leases_lost": sum(r["leases_lost"] for r in results.values()),
            "errors": sum(r["errors"] for r in results.values()),
            "target_p99_ms": 500,
        }
        print(json.dumps(summary), flush=True)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        tmp.cleanup()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
