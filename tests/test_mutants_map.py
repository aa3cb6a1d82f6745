"""tools/mutants.py takes each mutated module's tests from the tests layout, not from a hand list."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_tool():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("caviar_mutants_tool", ROOT / "tools" / "mutants.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_mutated_module_has_the_tests_of_its_feature() -> None:
    tool = load_tool()
    for module in tool.MODULES:
        files = tool.RUNS[module.run]
        assert files and all((ROOT / f.partition("::")[0]).is_file() for f in files)
    # the trials run uses the fast in-process subset, not the API tests that build an app per test
    assert tool.RUNS["trials"][0] == "tests/service/trials/test_lifecycle.py"
    assert "tests/service/trials/test_trials_api.py" not in tool.RUNS["trials"]
    assert "tests/service/store/test_records.py" in tool.RUNS["trials"]
    assert "tests/service/test_auth.py" in tool.RUNS["auth"]
    # the middleware's trial credentials are tested under tests/service/security/
    assert "tests/service/security/test_trial_credentials.py" in tool.RUNS["auth"]


def test_the_map_follows_the_layout(tmp_path: Path) -> None:
    tool = load_tool()
    for path in (
        "tests/service/quotas/test_quotas.py",
        "tests/service/quotas/test_quotas_race.py",
        "tests/service/trials/test_trials_api.py",
        "tests/service/studies/test_steering_api.py",
        "tests/service/test_auth.py",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    # a new feature folder is picked up with no edit to the tool; race tests are left out
    assert tool.tests_for("caviar/service/quotas/records.py", tmp_path) == (
        "tests/service/quotas/test_quotas.py",
    )
    assert tool.run_of("caviar/service/quotas/records.py", tmp_path) == "quotas"
    # a feature with a named fast subset (FAST_SUBSETS) is tested by it, not by its folder's files
    assert tool.tests_for("caviar/service/trials/leases.py", tmp_path) == tool.FAST_SUBSETS["trials"]
    # a flat module is tested by tests/service/test_<name>.py; tokens by auth's tests
    assert tool.tests_for("caviar/service/auth.py", tmp_path) == ("tests/service/test_auth.py",)
    assert tool.run_of("caviar/service/tokens/service.py", tmp_path) == "auth"


def test_the_store_shares_the_trials_run_and_the_worker_and_client_have_named_tests(tmp_path: Path) -> None:
    tool = load_tool()
    for path in ("tests/service/trials/test_trials_api.py", "tests/service/store/test_records.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    # the store's modules are mutated in the trials run, whose tests include the store's own
    assert tool.run_of("caviar/service/store/_budget.py", tmp_path) == "trials"
    assert tool.tests_for("caviar/service/store/_budget.py", tmp_path) == tool.tests_for(
        "caviar/service/trials/lifecycle.py", tmp_path
    )
    assert "tests/service/store/test_records.py" in tool.tests_for(
        "caviar/service/trials/lifecycle.py", tmp_path
    )
    assert tool.run_of("caviar/worker/_slot.py") == "worker"
    assert tool.run_of("caviar/_client.py") == "client"
    assert tool.tests_for("caviar/_client.py")[:2] == ("tests/test_client.py", "tests/test_optuna_trial.py")
    assert "tests/cli/test_study.py" in tool.tests_for("caviar/_client.py")  # the CLI runs in-process
    # a package's __init__ is matched apart from its submodules
    init = tool.Module("caviar/service/store/__init__.py")
    assert tool.selected(init, "caviar.service.store.x_add_trial__mutmut_1")
    assert not tool.selected(init, "caviar.service.store._budget.x_used_count__mutmut_1")
