# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

FW_VENV := .venv-frameworks

.PHONY: demo test test-frameworks lint browser bench mutate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamp files record which extras were installed, so a re-run is instant.
$(VENV)/.installed-server: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[server]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-server

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-server

demo: $(VENV)/.installed-server
	$(BIN)/paygent-otel demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check paygent_otel tests bench
	$(BIN)/mypy

# The framework tests need pipecat-ai and livekit-agents: a venv of their own (pyproject's
# frameworks-test extra), made once and reused like the main one.
$(FW_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FW_VENV)
	$(FW_VENV)/bin/python -m pip install -q --upgrade pip
	$(FW_VENV)/bin/python -m pip install -q -e '.[frameworks-test]'
	touch $@

# The usage-page tests load the pages in Debian's headless Chromium (~40 s to install).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: lint browser
	PAYGENT_REQUIRE_CHROMIUM=1 $(BIN)/python -m pytest -q tests --ignore=tests/frameworks
	$(MAKE) test-frameworks

test-frameworks: $(FW_VENV)/.installed
	$(FW_VENV)/bin/python -m pytest -q tests/frameworks

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run

$(VENV)/.installed-mutate: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[mutate]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-server

# Mutation testing of the mapping and the retry decision ([tool.mutmut] in pyproject.toml);
# not part of `make test`: it runs the selected tests once per mutant (minutes).
mutate: $(VENV)/.installed-mutate
	rm -rf mutants
	$(BIN)/mutmut run
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) $(FW_VENV) mutants .pytest_cache .mypy_cache .ruff_cache
