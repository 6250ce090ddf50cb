# The two commands of the README:
#   make run    install what the service needs into .venv, then serve (HIGGS_* settings apply)
#   make test   install the service and test dependencies into .venv, then run the test suite
# Each creates .venv on first use and reinstalls only when a requirements file changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-deps: requirements.txt | $(PY)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip check
	touch $@

$(VENV)/.test-deps: requirements.txt requirements-test.txt | $(PY)
	$(PY) -m pip install -r requirements-test.txt
	$(PY) -m pip check
	touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(PY) app.py

test: $(VENV)/.test-deps
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(VENV)/.test-deps
	$(PY) bench/bench_overhead.py
	$(PY) bench/bench_clone.py
	$(PY) bench/bench_streaming.py
	$(PY) bench/bench_batching.py
	$(PY) bench/bench_stt.py
