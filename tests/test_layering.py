"""Architecture rules, checked on the source (every import statement) and in fresh interpreters.

- one import name, one path per module: the code lives under ``caviar/`` with no links, and nothing
  (code or template) imports the old top-level ``service``, ``storage`` or ``trainer``;
- no import circles between caviar's modules (function-level imports and imports under
  ``TYPE_CHECKING`` included);
- the feature packages ``studies``, ``trials`` and ``workers`` meet only in the study store
  (``caviar.service.store``), which defines the trial-state map, the budget rule and the lease policy
  once and is the only user of Optuna's private models;
- no module of the service is over 500 lines;
- the trainer is a leaf: it imports nothing of caviar's service, storage or worker;
- the worker reaches the service over REST only: it imports nothing of the service or storage;
- the command line is a client of the REST API: only the operator's commands (``caviar.cli.serve``)
  load the service or the database, on demand, and ``import caviar.cli`` stays light;
- domain modules import neither FastAPI/Starlette nor the CLI (typer, rich) nor HTTP adapters;
- the service never imports torch, and ``import caviar`` stays light;
- an import inside a function is there to keep a heavy dependency off a light path, and says so
  in a ``# lazy:`` comment right above it (or on its line).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "caviar"
OLD_NAMES = ("service", "storage", "trainer")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or the module a name was imported from)
    line: int
    lazy: bool  # inside a function
    commented: bool  # a "# lazy:" comment on the line or right above its block
    type_only: bool  # under ``if TYPE_CHECKING:``


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def caviar_modules() -> dict[str, Path]:
    """Every module under ``caviar/``, walked without following links (there are none)."""
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            path = Path(folder) / file
            if file.endswith(".py") and "migrations" not in path.parts:
                found[module_name(path)] = path
    return dict(sorted(found.items()))


MODULES = caviar_modules()


def _resolve(source: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(source: str, path: Path) -> list[Import]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    found: list[Import] = []

    def commented(node: ast.stmt, body: list[ast.stmt]) -> bool:
        if "# lazy" in lines[node.lineno - 1]:
            return True
        index = body.index(node)
        while index > 0 and isinstance(body[index - 1], ast.Import | ast.ImportFrom):
            index -= 1  # the comment may head a block of imports
        first = body[index].lineno - 2
        return first >= 0 and lines[first].strip().startswith("# lazy:")

    def visit(body: list[ast.stmt], in_function: bool, type_only: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets: list[str] = []
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    base = _resolve(source, path, node)
                    for alias in node.names:
                        full = f"{base}.{alias.name}"
                        targets.append(full if full in MODULES else base)
                note = commented(node, body)
                found.extend(Import(source, t, node.lineno, in_function, note, type_only) for t in targets)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(node.body, True, type_only)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, in_function, type_only)
            elif isinstance(node, ast.If):
                guard = ast.unparse(node.test)
                visit(node.body, in_function, type_only or guard.endswith("TYPE_CHECKING"))
                visit(node.orelse, in_function, type_only)
            elif isinstance(node, ast.Try | ast.With | ast.For | ast.While):
                for block in ("body", "handlers", "orelse", "finalbody"):
                    for item in getattr(node, block, []):
                        visit(
                            item.body if isinstance(item, ast.ExceptHandler) else [item],
                            in_function,
                            type_only,
                        )

    visit(tree.body, False, False)
    return found


ALL_IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path)]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_package_is_found_without_following_links() -> None:
    for name in ("caviar", "caviar.service.api", "caviar.trainer.spec", "caviar.storage", "caviar.worker"):
        assert name in MODULES, name


def test_every_module_has_one_path_on_disk() -> None:
    """No links anywhere in the tree, and the top-level signpost folders hold no code."""
    tracked = subprocess.run(
        ["git", "ls-files", "-s"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()
    links = [line.split("\t")[1] for line in tracked if line.startswith("120000")]
    assert not links, links
    for folder in OLD_NAMES:
        assert (ROOT / folder / "README.md").is_file(), folder
        code = [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.name != "README.md"]
        assert not code, code


# Every file that holds code or a code template (Alembic renders ``.mako`` into migrations).
CODE_SUFFIXES = (".py", ".mako", ".pyi", ".sh", ".cfg", ".toml", ".ini")


def _imported_names(text: str) -> list[tuple[int, str]]:
    """(line, module) of every import statement in ``text``, read line by line (templates are no AST)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.strip().split()
        if len(words) >= 2 and words[0] in ("import", "from"):
            found += [(number, name.strip(",")) for name in words[1:2]]
            if words[0] == "import":
                found += [(number, name.strip(",")) for name in words[2:] if name != "as"]
    return found


# Runs the worker of a historical baseline commit, whose modules still had the old names.
HISTORICAL = {ROOT / "benchmarks" / "worker_overhead.py"}


def test_nothing_imports_the_old_top_level_names() -> None:
    files = [
        path
        for top in ("caviar", "tests", "benchmarks", "examples", "tools")
        for path in (ROOT / top).rglob("*")
        if path.is_file() and path.suffix in CODE_SUFFIXES and path not in HISTORICAL
    ]
    assert any(path.suffix == ".mako" for path in files)
    offenders = [
        f"{path}:{line}: {name}"
        for path in files
        for line, name in _imported_names(path.read_text())
        if name.split(".")[0] in OLD_NAMES
    ]
    assert not offenders, offenders


def test_type_only_imports_are_seen() -> None:
    """The circle test below reads imports under ``if TYPE_CHECKING:`` too (they circle all the same
    for a reader, mypy and import-graph tools)."""
    assert any(imp.type_only for imp in ALL_IMPORTS)


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in ALL_IMPORTS:
        if imp.target in MODULES and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    # Tarjan's strongly connected components: any component of 2+ modules is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            connect(node)
    assert not circles, circles


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        (
            "caviar.trainer",
            ("caviar.service", "caviar.storage", "caviar.worker", "fastapi", "sqlalchemy", "optuna"),
        ),
        ("caviar.worker", ("caviar.service", "caviar.storage", "sqlalchemy", "optuna", "fastapi")),
        ("caviar.storage", ("caviar.service", "caviar.trainer", "caviar.worker", "fastapi", "torch")),
        (
            "caviar.service",
            ("torch", "caviar.worker._trainer", "caviar.trainer._train", "caviar.trainer._data"),
        ),
    ],
)
def test_packages_stay_in_their_lane(package: str, forbidden: tuple[str, ...]) -> None:
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in ALL_IMPORTS
        if _within(imp.source, package) and any(_within(imp.target, f) for f in forbidden)
    ]
    assert not bad, bad


def test_the_service_reads_only_the_trainer_contract() -> None:
    """The service knows the trainer through ``caviar.trainer.spec`` (no torch); the one other use,
    ``caviar gradcheck``, loads the trainer on demand."""
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in ALL_IMPORTS
        if _within(imp.source, "caviar.service")
        and _within(imp.target, "caviar.trainer")
        and imp.target != "caviar.trainer.spec"
        and not imp.lazy
    ]
    assert not bad, bad


DOMAIN = [
    name
    for name in MODULES
    if name.startswith(("caviar.service.definition", "caviar.service.trials", "caviar.service.studies"))
    or name.startswith(("caviar.service.schedules", "caviar.service.tokens", "caviar.service.workers"))
    or name in ("caviar.service.errors", "caviar.service.db", "caviar.service.config")
]
ADAPTERS = ("fastapi", "starlette", "typer", "rich", "click", "uvicorn")


def test_domain_modules_import_no_http_or_cli() -> None:
    domain = [name for name in DOMAIN if not name.endswith(".router")]
    assert "caviar.service.trials.lifecycle" in domain and "caviar.service.studies.service" in domain
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in ALL_IMPORTS
        if imp.source in domain
        and (
            any(_within(imp.target, a) for a in ADAPTERS)
            or imp.target.endswith(".router")
            or _within(imp.target, "caviar.cli")
            or imp.target in ("caviar.service.api", "caviar.service.envelope")
        )
    ]
    assert not bad, bad


FEATURES = ("caviar.service.studies", "caviar.service.trials", "caviar.service.workers")
STORE = "caviar.service.store"


def _feature(module: str) -> str | None:
    return next((f for f in FEATURES if _within(module, f)), None)


def test_studies_trials_and_workers_meet_only_in_the_store() -> None:
    """Each feature package imports the store and its own modules, never another feature package;
    the store imports none of them."""
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in ALL_IMPORTS
        if (_feature(imp.source) or (STORE if _within(imp.source, STORE) else None)) is not None
        and _feature(imp.target) is not None
        and _feature(imp.target) != _feature(imp.source)
    ]
    assert not bad, bad
    assert any(_within(imp.source, "caviar.service.trials") and imp.target == STORE for imp in ALL_IMPORTS)


def test_the_store_modules_are_private_and_re_exported() -> None:
    """Outside the store, code imports ``caviar.service.store`` itself, never its ``_module`` files
    (tests may reach in, e.g. to patch its clock)."""
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in ALL_IMPORTS
        if _within(imp.target, STORE) and imp.target != STORE and not _within(imp.source, STORE)
    ]
    assert not bad, bad


MAX_LINES = 500


def test_no_module_of_the_service_is_over_500_lines() -> None:
    long = {
        name: count
        for name, path in MODULES.items()
        if _within(name, "caviar.service") and (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def _definitions(pattern: str) -> list[str]:
    """``path:line`` of every line of caviar's code that matches ``pattern`` (a regular expression)."""
    regex = re.compile(pattern)
    return [
        f"{path.relative_to(ROOT)}:{number}"
        for name, path in MODULES.items()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if regex.search(line)
    ]


@pytest.mark.parametrize(
    ("what", "pattern", "home"),
    [
        # the trial-state map: Optuna's states to the API's names
        ("state map", r"TrialState\.\w+\s*:\s*[\"']\w+[\"']", "caviar/service/store/_states.py"),
        ("state names", r"[\"']waiting[\"']", None),
        ("state map (reverse)", r"[\"']\w+[\"']\s*:\s*TrialState\.\w+", None),
        # the budget rule: which states use the budget, which spend it
        ("budget rule (states using it)", r"^\s*USING_BUDGET\s*=", "caviar/service/store/_budget.py"),
        ("budget rule (states spending it)", r"^\s*DONE\s*=", "caviar/service/store/_budget.py"),
        ("budget rule (used_count)", r"^def used_count\(", "caviar/service/store/_budget.py"),
        ("budget arithmetic", r"counts\[TrialState\.\w+\]\s*\+", None),
        # the lease policy: one class, built from Settings in one place, lease = 2 x heartbeat once
        ("lease policy", r"^class LeasePolicy\b", "caviar/service/store/_leases.py"),
        (
            "lease length",
            r"2\s*\*\s*[\w.]*heartbeat|heartbeat\w*\s*\*\s*2\b",
            "caviar/service/store/_leases.py",
        ),
        ("lease policy built", r"LeasePolicy\(|LeasePolicy\.from_settings\(", None),
        ("lease-status-to-error map", r"[\"'](reaped|released)[\"']\s*:", "caviar/service/store/_leases.py"),
        # Optuna's private models
        ("Optuna's private models", r"optuna\.storages\._rdb", "caviar/service/store/_tables.py"),
    ],
)
def test_defined_once(what: str, pattern: str, home: str | None) -> None:
    found = _definitions(pattern)
    if home is None:  # allowed only where the test below names
        allowed = ONLY_HERE.get(what, ())
        assert all(any(spot.startswith(a) for a in allowed) for spot in found), (what, found)
    else:  # in one file, as one block of consecutive lines (one definition)
        assert found and all(spot.startswith(home + ":") for spot in found), (what, found)
        lines = [int(spot.rpartition(":")[2]) for spot in found]
        assert lines == list(range(lines[0], lines[0] + len(lines))), (what, found)


ONLY_HERE: dict[str, tuple[str, ...]] = {
    # the map, and the API's Literal of its names (test_the_api_names_the_states_of_the_map)
    "state names": ("caviar/service/store/_states.py", "caviar/service/trials/schemas.py"),
    "state map (reverse)": (),  # derived from the map (FINISHED_BY_NAME), never written again
    "budget arithmetic": (),  # used_count / done_count / budget_spent, never summed by hand
    # built in the store (from_settings) and, from the app's settings, by the HTTP dependency
    "lease policy built": ("caviar/service/store/_leases.py", "caviar/service/deps.py"),
}


def test_the_api_names_the_states_of_the_map() -> None:
    from typing import get_args

    from caviar.service.store import STATE_NAMES
    from caviar.service.trials.schemas import TrialStateName

    assert list(get_args(TrialStateName)) == list(STATE_NAMES.values())


def test_every_function_level_import_says_why() -> None:
    silent = [
        f"{imp.source}:{imp.line} {imp.target}" for imp in ALL_IMPORTS if imp.lazy and not imp.commented
    ]
    assert not silent, "imports inside functions need a '# lazy: <why>' comment: " + ", ".join(silent)


def _imported_by(statement: str, *modules: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(','.join(m for m in {modules!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return [m for m in result.stdout.strip().split(",") if m]


def test_import_caviar_is_light() -> None:
    assert _imported_by("import caviar", "torch", "fastapi", "sqlalchemy", "optuna", "starlette") == []


@pytest.mark.parametrize(
    "statement",
    [
        "import caviar.service.api, caviar.service.trials, caviar.service.schedules.service",
        "from caviar.cli import app",
    ],
)
def test_the_service_never_imports_torch(statement: str) -> None:
    assert _imported_by(statement, "torch") == []


SERVICE_SIDE = ("caviar.service", "caviar.storage", "sqlalchemy", "optuna", "fastapi", "starlette", "uvicorn")


def test_the_cli_is_a_client_of_the_rest_api() -> None:
    """Commands reach the service through ``caviar.Client``; only the operator's commands
    (``serve``, ``dashboard``, ``db upgrade``, ``demo`` in ``caviar.cli.serve``) load the service
    and the database, inside the command."""
    assert "caviar.cli.study" in MODULES and "caviar.worker._cli" in MODULES
    bad = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in ALL_IMPORTS
        if _within(imp.source, "caviar.cli")
        and any(_within(imp.target, f) for f in SERVICE_SIDE)
        and not (imp.source == "caviar.cli.serve" and (imp.lazy or imp.type_only))
    ]
    assert not bad, bad


def test_the_cli_loads_light() -> None:
    """``caviar --help`` and every REST command load neither the service, the database nor torch."""
    heavy = ("torch", "numpy", "pydantic_settings", "caviar.service", "caviar.storage", "caviar.trainer")
    assert _imported_by("from caviar.cli import app; app", *heavy, *SERVICE_SIDE) == []


def test_the_trainer_and_worker_never_import_the_web_stack() -> None:
    statement = "import caviar.trainer, caviar.worker, caviar.worker._slot; caviar.trainer.train"
    assert _imported_by(statement, "fastapi", "starlette", "sqlalchemy", "optuna") == []


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("caviar_hpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "caviar",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    shipped = {
        name.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        for name in names
        if name.endswith(".py")
    }
    missing = {m for m in MODULES if m not in shipped}
    assert not missing, missing
    assert "caviar/storage/migrations/script.py.mako" in names
    assert "caviar/service/examples/digits-mlp.yaml" in names
