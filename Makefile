# caviar task runner. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Tests run on SQLite and then on this PostgreSQL server (each run creates and drops its own databases).
PG_TEST_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
PYTEST_ARGS ?=
# `make test-long`: the model-based and race tests with many more examples, the fuzzers, and the
# examples on their full budgets (CAVIAR_TEST_LONG=1; CI runs them on smaller ones).
LONG_EXAMPLES ?= 500
LONG_STEPS ?= 80
LONG_TESTS ?= tests/service/trials/test_trials_stateful.py tests/service/trials/test_trials_concurrency.py \
	tests/service/test_fuzz.py tests/service/test_fuzz_stateful.py tests/service/test_fuzz_scopes.py tests/examples \
	tests/worker/test_fused_diversity.py
LONG_ENV = CAVIAR_STATEFUL_EXAMPLES=$(LONG_EXAMPLES) CAVIAR_STATEFUL_STEPS=$(LONG_STEPS) CAVIAR_TEST_LONG=1

# Python may write its bytecode caches, whatever the environment says (some images set
# PYTHONDONTWRITEBYTECODE=1, this machine's included): the tests start hundreds of Python
# processes (servers, workers, slots, trials, CLI calls), and without the caches each of them
# compiled caviar's modules again (about 0.2 s of CPU each) and each pytest process rewrote the
# asserts of every test module again (collection 12.5 s instead of 6.6 s).
unexport PYTHONDONTWRITEBYTECODE

# Every install takes its versions from the lock (`make lock` refreshes it from pyproject.toml).
CONSTRAINTS := requirements/constraints.txt
LOCK_ARGS ?=

.PHONY: install install-runtime lock demo docs test test-sqlite test-postgres test-long lint format bench mutants clean

# `make demo` installs the runtime only; `make install` (tests, lint, docs) adds the dev extras.
install-runtime: $(VENV)/.runtime
install: $(VENV)/.installed

# torch first, pinned: 2.13.0 is a CPU build that lies on this project's machines (an unpinned
# torch pulls a multi-GB CUDA build); the project's own range accepts it.
$(VENV)/.runtime: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

# Re-resolve the lock after a change to pyproject.toml's dependencies (keeps the other pins;
# LOCK_ARGS=--upgrade moves everything to the newest allowed versions). Needs PyPI. It needs only
# uv, not a full install (which a stale lock may refuse).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install -q -c $(CONSTRAINTS) uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra parquet -c requirements/torch.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock" -q $(LOCK_ARGS) -o $(CONSTRAINTS)

demo: install-runtime
	$(BIN)/caviar demo

test: test-sqlite test-postgres

# Two pytest processes (pytest-xdist; the tests wait on servers and workers as much as they
# compute), each test file kept on one (module-scoped servers); then, alone, the tests marked
# `serial` (one restarts PostgreSQL). XDIST= runs everything in one process.
XDIST ?= -n 2 --dist loadfile
define run_tests
	$(1) $(BIN)/python -m pytest $(XDIST) -m "not serial" $(PYTEST_ARGS)
	$(1) $(BIN)/python -m pytest -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]
endef

test-sqlite: install
	$(call run_tests,)

test-postgres: install
	$(call run_tests,CAVIAR_TEST_DATABASE=$(PG_TEST_URL))

test-long: install
	$(LONG_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS) $(LONG_TESTS)
	$(LONG_ENV) CAVIAR_TEST_DATABASE=$(PG_TEST_URL) $(BIN)/python -m pytest $(PYTEST_ARGS) $(LONG_TESTS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The docs site (mkdocs.yml, docs/): warnings are errors; the output goes to site/ (git-ignored).
docs: install
	$(BIN)/mkdocs build --strict --site-dir site

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/fused_training.py --quick

# Mutation testing of the domain core (trial lifecycle, leases, outcomes, schedule firing, auth),
# each module against its own test subset; prints killed/total per module. Slow: not in CI.
# MUTANTS_ARGS="--run auth" runs one part; "--report --survivors" shows the last results.
MUTANTS_ARGS ?=
mutants: install
	$(BIN)/python tools/mutants.py $(MUTANTS_ARGS)

clean:
	rm -rf $(VENV) .mutmut site caviar.db caviar.db-* caviar-artifacts .pytest_cache .mypy_cache .ruff_cache
