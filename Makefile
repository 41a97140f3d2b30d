# chatd — the two commands of the README, and the rest.
#   make run    install into .venv and run chatd on the embedded defaults
#   make test   install everything the tests need (system packages too) and run them all

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= chatd-data

.PHONY: run test venv venv-test system-deps lint format loadtest bench dist clean fuzz

$(VENV)/.base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(VENV)/.base
venv-test: $(VENV)/.test

run: venv
	$(VENV)/bin/chatd serve --data-dir $(DATA) --log-format text

system-deps:
	./scripts/install-system-deps

lint: venv-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: venv-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: system-deps venv-test lint
	CHATD_TEST_STRICT=1 $(PY) -m pytest

dist:
	./scripts/build-dist

# The property-based tests with a long example budget (CI runs a short one).
fuzz: venv-test
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/core/test_properties.py tests/e2e/test_fuzz_live.py

USERS    ?= 40
SPAWN    ?= 10
TIME     ?= 30s
REPLICAS ?= 2

loadtest: system-deps venv
	PYTHON=$(PY) loadtest/run --users $(USERS) --spawn-rate $(SPAWN) --time $(TIME) --replicas $(REPLICAS)

bench: system-deps venv
	$(PY) loadtest/bench.py --publish

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
