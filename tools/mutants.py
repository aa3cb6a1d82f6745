"""Mutation testing of caviar's domain core with mutmut 3 (``make mutants``; slow, not in CI).

Why a driver around mutmut: mutmut 3 mutates a copy of the sources in ``./mutants`` and puts
that folder first on ``sys.path``, and it reads one configuration per folder, so one run can have
only one test selection. This script therefore runs mutmut once per *run* below, each in its own
scratch folder ``.mutmut/<run>`` holding symlinks to ``caviar`` and ``tests`` and a generated
``pyproject.toml`` whose ``source_paths`` name the package (so the copy in ``mutants/caviar`` is
a complete, real package and imports resolve to it, not to the editable
install). Each module is mutated against the tests of its feature, found from the tests layout
(tests/service/<feature>/ mirrors caviar/service/<feature>/, see :func:`tests_for`); mutmut then
runs, per mutant, only the tests of that subset that called the mutated function.

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
    """One mutated module: its file and the functions mutated (globs over mutmut's mangled names,
    ``*`` for all). Its run (test subset) follows from where it lives: :func:`run_of`."""

    path: str
    functions: tuple[str, ...] = ("*",)

    @property
    def run(self) -> str:
        return run_of(self.path)


# The tests of a module come from the tests layout, which mirrors the package: a module of
# caviar/service/<feature>/ is tested by tests/service/<feature>/test_*.py, a module
# caviar/service/<name>.py by tests/service/test_<name>.py. A run is one feature: the modules that
# share a test subset share a run (one mutmut stats pass instead of several).
SERVICE = "caviar/service"
TESTS = "tests/service"
# features whose behaviour another feature's tests drive, with why:
ALSO_TESTED_BY: dict[str, tuple[str, ...]] = {
    # tokens are auth's credentials: test_auth.py creates, uses and revokes them
    "tokens": ("auth", "security"),
    # the middleware's trial credentials (cvt_...) and worker identities: tests/service/security/
    "auth": ("security",),
}
# features tested in their run by a named fast in-process subset instead of their test folder (and
# the folders of ALSO_TESTED_BY): mutmut runs, per mutant, every test of the selection that calls the
# mutated function, so a survivor costs all of them. Each test of tests/service/trials/test_trials_api.py
# and tests/studies/test_steering_api.py builds an app and calls `ask`: with them the trials run
# checked about 8 mutants a minute and needed hours. test_lifecycle.py calls ask, report, heartbeat,
# tell, release, the reaper and the steering functions directly on a database (no app, no threads).
# The contract tests of features folded into the run (RUN_OF_FEATURE: the store) still join it.
FAST_SUBSETS: dict[str, tuple[str, ...]] = {
    "trials": (
        "tests/service/trials/test_lifecycle.py",
        # the store's check of file: datasets at creation (the rest of that file parses definitions)
        "tests/service/definition/test_data_files.py::test_the_local_cli_path_may_name_files",
    ),
}
# features mutated in another feature's run, whose tests they share (one stats pass for both): the
# store's budget, leases and settling are driven end to end by the trial and steering tests, and
# the store's own contract tests join that run
RUN_OF_FEATURE: dict[str, str] = {"store": "trials"}
# modules outside caviar/service: their run and its tests, named here. Only tests that run the
# module in the test's own process count (mutmut records which test calls which function, and the
# mutant is active only in that process): the worker's end-to-end tests start worker processes
# from the editable install and are left out, and so are its in-process runs of a slot against a
# live service (a minute each: too slow per mutant); the worker's fast subset drives the slot and
# the trainer runner with stand-in trials instead.
OUTSIDE_SERVICE: dict[str, tuple[str, tuple[str, ...]]] = {
    "caviar/worker/": (
        "worker",
        (
            "tests/worker/test_slot.py",
            "tests/worker/test_trainer_runner.py",
            "tests/worker/test_supervisor.py",
            "tests/worker/test_data_files.py",
            "tests/worker/test_worker.py::test_discover_slots",
        ),
    ),
    # the client's own tests, its Optuna-compatible trial (define-by-run), and the command line,
    # whose commands run in-process (typer's CliRunner) through the client
    "caviar/_client.py": (
        "client",
        (
            "tests/test_client.py",
            "tests/test_optuna_trial.py",
            "tests/cli/test_study.py",
            "tests/cli/test_schedule.py",
            "tests/cli/test_token.py",
            "tests/cli/test_doctor.py",
        ),
    ),
}
# property-based and race tests take minutes per mutant; `make test-long` runs them at length
SLOW_TEST_FILES = ("*_stateful.py", "*_concurrency.py", "*_race.py")


def feature_of(path: str) -> str:
    """``caviar/service/trials/leases.py`` -> ``trials``; ``caviar/service/auth.py`` -> ``auth``."""
    parts = Path(path).relative_to(SERVICE).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def feature_tests(feature: str, root: Path = ROOT) -> list[str]:
    """The test files of one feature: its folder under tests/service, else its one test module."""
    folder = root / TESTS / feature
    if folder.is_dir():
        found = sorted(folder.glob("test_*.py"))
    else:
        found = [path for path in [root / TESTS / f"test_{feature}.py"] if path.exists()]
    return [
        str(path.relative_to(root))
        for path in found
        if not any(fnmatch.fnmatch(path.name, pattern) for pattern in SLOW_TEST_FILES)
    ]


def outside_service(path: str) -> tuple[str, tuple[str, ...]] | None:
    """The run and tests of a module outside caviar/service (:data:`OUTSIDE_SERVICE`), else None."""
    for prefix, found in OUTSIDE_SERVICE.items():
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return found
    return None


def tests_for(path: str, root: Path = ROOT) -> tuple[str, ...]:
    """The test files a mutant of the module at ``path`` runs against (from the tests layout)."""
    named = outside_service(path)
    if named:
        return named[1]
    feature = feature_of(path)
    feature = RUN_OF_FEATURE.get(feature, feature)
    files: list[str] = list(FAST_SUBSETS.get(feature, ()))
    own = () if feature in FAST_SUBSETS else (feature, *ALSO_TESTED_BY.get(feature, ()))
    runs_here = [name for name, into in RUN_OF_FEATURE.items() if into == feature]
    for name in (*own, *runs_here):
        files += [f for f in feature_tests(name, root) if f not in files]
    if not files:
        raise SystemExit(
            f"mutants: no tests for {path} under {TESTS}/{feature}/ or {TESTS}/test_{feature}.py"
        )
    return tuple(files)


def run_of(path: str, root: Path = ROOT) -> str:
    """The run of a module: the first feature whose tests it runs against (its own, usually)."""
    named = outside_service(path)
    if named:
        return named[0]
    feature = feature_of(path)
    if feature in RUN_OF_FEATURE:
        return RUN_OF_FEATURE[feature]
    for name in (feature, *ALSO_TESTED_BY.get(feature, ())):
        if feature_tests(name, root):
            return name
    return feature


MODULES: tuple[Module, ...] = (
    Module("caviar/service/trials/lifecycle.py"),
    Module("caviar/service/trials/reports.py"),
    Module("caviar/service/trials/leases.py"),
    Module("caviar/service/trials/outcomes.py"),
    # the whole store: the budget rule, leases, settling, records, creation, ranking and states
    Module("caviar/service/store/__init__.py"),
    Module("caviar/service/store/_artifacts.py"),
    Module("caviar/service/store/_budget.py"),
    Module("caviar/service/store/_create.py"),
    Module("caviar/service/store/_leases.py"),
    Module("caviar/service/store/_ranking.py"),
    Module("caviar/service/store/_records.py"),
    Module("caviar/service/store/_settle.py"),
    Module("caviar/service/store/_states.py"),
    # the firing and next-run part of schedules (not CRUD, not validation)
    Module(
        "caviar/service/schedules/service.py",
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
        ("xǁCronScheduleǁ*", "x__offset_at", "x__changes_in_year", "x__time_diff", "x__naive"),
    ),
    Module("caviar/service/auth.py"),
    Module("caviar/service/tokens/service.py"),
    # the worker: a slot's loop, leases and hand-backs; the supervisor; fused training and its
    # out-of-memory halving
    Module("caviar/worker/_slot.py"),
    Module("caviar/worker/_supervisor.py"),
    Module("caviar/worker/_trainer.py"),
    Module("caviar/_client.py"),
)

# run -> its test files (modules of one feature share a run: one mutmut stats pass for them)
RUNS: dict[str, tuple[str, ...]] = {run_of(m.path): tests_for(m.path) for m in MODULES}

# exit codes as mutmut records them (mutmut.stats.status_by_exit_code)
KILLED = {1, 3, 36, 24, -24, 152, 255, 37}  # failed tests, timeouts, caught by type check
SURVIVED = {0}
NO_TESTS = {5, 33}


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def mutant_globs(module: Module) -> list[str]:
    # every mangled name starts with "x" (``x_function``, ``xǁClassǁmethod``): "x*" keeps a
    # package's __init__ (``caviar.service.store``) from matching its submodules' mutants
    return [f"{module_name(module.path)}.{'x*' if fn == '*' else fn}__mutmut_*" for fn in module.functions]


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
        # one path per module: the package's folder holds every module (naming a subfolder too
        # would make mutmut collect its files twice)
        "source_paths": ["caviar"],
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


def check(run: str, test_file: str, expression: str, mutants: list[str]) -> int:
    """Run the tests of ``test_file`` matching ``expression`` against each named mutant of the
    last ``run`` (the current test file copied into its ``mutants`` folder first), in one process:
    mutmut's trampoline reads ``MUTANT_UNDER_TEST`` at each call. A mutant is killed when the
    tests fail; the tests must pass on the real code first."""
    folder = SCRATCH / run / "mutants"
    shutil.copyfile(ROOT / test_file, folder / test_file)
    script = (
        "import os, sys, pytest\n"
        "file, expr, *names = sys.argv[1:]\n"
        "args = ['-p', 'no:cacheprovider', '-p', 'no:warnings', '-q', '-x', file, '-k', expr]\n"
        "os.environ.pop('MUTANT_UNDER_TEST', None)\n"
        "if int(pytest.main(args)) != 0: sys.exit('the tests fail on the real code')\n"
        "missed = 0\n"
        "for name in names:\n"
        "    os.environ['MUTANT_UNDER_TEST'] = name\n"
        "    code = int(pytest.main(args))\n"
        "    missed += code != 1\n"
        "    print('MUTANT', name, 'killed' if code == 1 else f'NOT KILLED (exit {code})', flush=True)\n"
        "sys.exit(1 if missed else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, test_file, expression, *mutants], cwd=folder, env=env, check=False
    )
    return done.returncode


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
    parser.add_argument(
        "--check",
        nargs="+",
        metavar=("RUN TEST_FILE K_EXPRESSION", "MUTANT"),
        help="run the tests of TEST_FILE matching K_EXPRESSION against each MUTANT of RUN's last run",
    )
    args = parser.parse_args()
    if args.check:
        if len(args.check) < 4:
            parser.error("--check RUN TEST_FILE K_EXPRESSION MUTANT [MUTANT ...]")
        return check(args.check[0], args.check[1], args.check[2], args.check[3:])
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
