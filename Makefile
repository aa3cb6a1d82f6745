# caviar task runner. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Tests run on SQLite and then on this PostgreSQL server (each run creates and drops its own databases).
PG_TEST_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
PYTEST_ARGS ?=
# `make test-long`: the model-based and race tests with many more examples, plus the fuzzers.
LONG_EXAMPLES ?= 500
LONG_STEPS ?= 80
LONG_TESTS ?= tests/service/trials/test_trials_stateful.py tests/service/trials/test_trials_concurrency.py \
	tests/service/test_fuzz.py tests/service/test_fuzz_stateful.py
LONG_ENV = CAVIAR_STATEFUL_EXAMPLES=$(LONG_EXAMPLES) CAVIAR_STATEFUL_STEPS=$(LONG_STEPS)

.PHONY: install demo test test-sqlite test-postgres test-long lint docs format bench mutants clean

install: $(VENV)/.installed

# torch first, pinned: 2.13.0 is a CPU build that lies on this project's machines (an unpinned
# torch pulls a multi-GB CUDA build); the project's own range accepts it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/caviar demo

test: test-sqlite test-postgres

test-sqlite: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-postgres: install
	CAVIAR_TEST_DATABASE=$(PG_TEST_URL) $(BIN)/python -m pytest $(PYTEST_ARGS)

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
