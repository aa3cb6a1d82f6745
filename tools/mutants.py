"""Mutation testing of caviar's domain core with mutmut 3 (``make mutants``; slow, not in CI).

Why a driver around mutmut: mutmut 3 mutates a copy of the sources in ``./mutants`` and puts
that folder first on ``sys.path``, but it walks source folders without following symlinks, and
``caviar/service``, ``caviar/storage`` and ``caviar/trainer`` are symlinks to the top-level
folders. It also reads one configuration per folder, so one run can have only one test
selection. This script therefore runs mutmut once per *run* below, each in its own scratch
folder ``.mutmut/<run>`` holding symlinks to ``caviar`` and ``tests`` and a generated
``pyproject.toml`` whose ``source_paths`` name the symlinked packages explicitly (so the copy in
``mutants/caviar`` is a complete, real package and imports resolve to it, not to the editable
install). Each module is mutated against its own fast subset of tests (``MODULES``); mutmut
then runs, per mutant, only the tests of that subset that called the mutated function.

Usage::

    python tools/mutants.py                 # every run, fresh, then the scores
    python tools/mutants.py --run auth      # one run
    python tools/mutants.py --report        # the scores of the last runs, without running
    python tools/mutants.py --survivors     # ... and the diff of every surviving mutant
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutmut"
MUTMUT = Path(sys.executable).parent / "mutmut"


@dataclass(frozen=True)
class Module:
    """One mutated module: its file, the functions mutated (globs over mutmut's mangled names,
    ``*`` for all) and the run (test subset) it belongs to."""

    path: str
    run: str
    functions: tuple[str, ...] = ("*",)


# module -> run; run -> test files. Modules that share a test subset share a run (one mutmut
# stats pass instead of several).
RUNS: dict[str, tuple[str, ...]] = {
    # test_steering_api.py: stops (end_study, cancel_waiting), which test_trials_api.py never calls
    "trials": ("tests/service/trials/test_trials_api.py", "tests/service/studies/test_steering_api.py"),
    "schedules": (
        "tests/service/schedules/test_schedules.py",
        "tests/service/schedules/test_schedules_cron.py",
    ),
    "auth": ("tests/service/test_auth.py",),
}

MODULES: tuple[Module, ...] = (
    Module("caviar/service/trials/lifecycle.py", "trials"),
    Module("caviar/service/trials/leases.py", "trials"),
    Module("caviar/service/trials/outcomes.py", "trials"),
    Module("caviar/service/store/_budget.py", "trials"),
    Module("caviar/service/store/_leases.py", "trials"),
    Module("caviar/service/store/_settle.py", "trials"),
    # the firing and next-run part of schedules (not CRUD, not validation)
    Module(
        "caviar/service/schedules/service.py",
        "schedules",
        (
            "x__next_tick",
            "x_run_now",
            "x__finish",
            "x__recover_pending",
            "x__overlapping",
            "x__fire_one",
            "x_fire_due",
        ),
    ),
    Module(
        "caviar/service/schedules/_cron.py",
        "schedules",
        ("xǁCronScheduleǁ*", "x__offset_at", "x__changes_in_year", "x__time_diff", "x__naive"),
    ),
    Module("caviar/service/auth.py", "auth"),
    Module("caviar/service/tokens/service.py", "auth"),
)

# exit codes as mutmut records them (mutmut.stats.status_by_exit_code)
KILLED = {1, 3, 36, 24, -24, 152, 255, 37}  # failed tests, timeouts, caught by type check
SURVIVED = {0}
NO_TESTS = {5, 33}


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def mutant_globs(module: Module) -> list[str]:
    return [f"{module_name(module.path)}.{fn}__mutmut_*" for fn in module.functions]


def selected(module: Module, key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in mutant_globs(module))


def toml_value(value: object) -> str:
    """TOML for the strings, lists of strings, numbers and booleans written here (JSON's
    spelling of those is valid TOML)."""
    return json.dumps(value, ensure_ascii=False)


def write_config(folder: Path, run: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    pytest_options = project["tool"]["pytest"]["ini_options"]
    mutmut = {
        # the symlinked packages are named: mutmut's walk does not follow symlinks
        "source_paths": ["caviar", "caviar/service", "caviar/storage", "caviar/trainer"],
        "only_mutate": [m.path for m in MODULES if m.run == run],
        "pytest_add_cli_args_test_selection": list(RUNS[run]),
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-p", "no:xdist"],
        "also_copy": ["tests/"],
    }
    lines = ["[tool.mutmut]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in mutmut.items()]
    lines += ["", "[tool.pytest.ini_options]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in pytest_options.items() if key != "testpaths"]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n", "utf-8")


def prepare(run: str) -> Path:
    folder = SCRATCH / run
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("caviar", "tests"):
        (folder / name).symlink_to(ROOT / name)
    write_config(folder, run)
    return folder


def run_mutmut(run: str, max_children: int, minutes: float | None) -> float:
    """Run mutmut over one run's modules; stop it after ``minutes`` (what it checked by then
    is kept: mutmut saves each result as it comes)."""
    folder = prepare(run)
    globs = [g for m in MODULES if m.run == run for g in mutant_globs(m)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    print(f"== mutmut run ({run}): {', '.join(RUNS[run])}", flush=True)
    start = time.monotonic()
    log = (SCRATCH / f"{run}.log").open("w")
    process = subprocess.Popen(
        [str(MUTMUT), "run", "--max-children", str(max_children), *globs],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        code = process.wait(timeout=minutes * 60 if minutes else None)
        if code != 0:
            print(f"== mutmut failed ({code}); see {log.name}", flush=True)
    except subprocess.TimeoutExpired:
        print(f"== {run}: time budget of {minutes:g} min used up; stopping mutmut", flush=True)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    finally:
        log.close()
    return time.monotonic() - start


@dataclass
class Score:
    killed: int = 0
    survived: int = 0
    other: int = 0  # no tests, suspicious, segfault
    unchecked: int = 0  # not run (the time budget ran out first)

    @property
    def total(self) -> int:
        """The mutants checked: killed, survived or otherwise not killed."""
        return self.killed + self.survived + self.other

    def add(self, other: Score) -> None:
        self.killed += other.killed
        self.survived += other.survived
        self.other += other.other
        self.unchecked += other.unchecked

    def line(self, label: str) -> str:
        pct = 100.0 * self.killed / self.total if self.total else 0.0
        extra = f", {self.other} not killed otherwise" if self.other else ""
        unchecked = f"; {self.unchecked} not checked" if self.unchecked else ""
        return (
            f"{label:<40} {self.killed:>4}/{self.total:<4} {pct:5.1f}%  "
            f"({self.survived} survived{extra}{unchecked})"
        )


def report(show: bool) -> int:
    overall = Score()
    survivors: list[tuple[str, str, str]] = []  # run, key, status
    for module in MODULES:
        meta = SCRATCH / module.run / "mutants" / (module.path + ".meta")
        if not meta.exists():
            print(f"{module.path:<40} not run")
            continue
        exit_codes = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
        score = Score()
        for key, code in sorted(exit_codes.items()):
            if not selected(module, key):
                continue
            if code is None:
                score.unchecked += 1
            elif code in KILLED:
                score.killed += 1
            elif code in SURVIVED:
                score.survived += 1
                survivors.append((module.run, key, "survived"))
            else:
                score.other += 1
                survivors.append((module.run, key, "no tests" if code in NO_TESTS else f"exit {code}"))
        overall.add(score)
        print(score.line(module.path))
    print(overall.line("overall"))
    if survivors:
        print("\nnot killed:")
        for run, key, status in survivors:
            print(f"  {key}  [{status}]")
            if show:
                shown = subprocess.run(
                    [str(MUTMUT), "show", key], cwd=SCRATCH / run, capture_output=True, text=True, check=False
                )
                print("\n".join("    " + line for line in shown.stdout.splitlines()))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", choices=sorted(RUNS), help="only this run (repeatable)")
    parser.add_argument("--report", action="store_true", help="only print the scores of the last runs")
    parser.add_argument("--survivors", action="store_true", help="print the diff of every survivor")
    parser.add_argument("--max-children", type=int, default=int(os.environ.get("MUTANTS_JOBS", "2")))
    parser.add_argument(
        "--minutes",
        type=float,
        default=float(os.environ.get("MUTANTS_MINUTES", "0")) or None,
        help="time budget per run (default: none); unchecked mutants are reported as such",
    )
    args = parser.parse_args()
    if not args.report:
        total = 0.0
        for run in args.run or list(RUNS):
            elapsed = run_mutmut(run, args.max_children, args.minutes)
            total += elapsed
            print(f"== {run}: {elapsed / 60:.1f} min", flush=True)
        print(f"== wall time: {total / 60:.1f} min\n")
    return report(args.survivors)


if __name__ == "__main__":
    sys.exit(main())
