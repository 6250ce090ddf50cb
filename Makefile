# The commands of the README:
#   make run      install what the service needs into .venv, then serve (HIGGS_* settings apply)
#   make test     install the service, test and Ray dependencies into .venv, then run the test suite
#   make cluster  install the service and Ray into .venv, then serve on a Ray cluster (cluster.py)
# Each creates .venv on first use and reinstalls only when a requirements file changed.
# Ray comes in a second pip pass: it needs a newer protobuf than descript-audiotools declares, the one
# override that requirements-ray.txt documents and .ci/pip_check.py tolerates (pip check stays strict
# about everything else).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_CHECK := $(PY) .ci/pip_check.py

.PHONY: run test cluster lint bench

$(PY):
	$(PYTHON) -m venv $(VENV)

# A venv that already has Ray (from make test or make cluster) gets its protobuf back after the first pass,
# which downgrades it; make run never installs Ray into one without.
$(VENV)/.run-deps: requirements.txt | $(PY)
	$(PY) -m pip install -r requirements.txt
	if [ -f $(VENV)/.ray-deps ]; then $(PY) -m pip install -r requirements-ray.txt; fi
	$(PIP_CHECK)
	touch $@

$(VENV)/.ray-deps: $(VENV)/.run-deps requirements-ray.txt
	$(PY) -m pip install -r requirements-ray.txt
	$(PIP_CHECK)
	touch $@

$(VENV)/.test-deps: requirements.txt requirements-test.txt requirements-ray.txt | $(PY)
	$(PY) -m pip install -r requirements-test.txt
	$(PY) -m pip install -r requirements-ray.txt
	$(PIP_CHECK)
	touch $@ $(VENV)/.run-deps $(VENV)/.ray-deps

run: $(VENV)/.run-deps
	$(PY) app.py

# Debian's Chromium drives the web page's tests (tests/test_web.py); installed once when missing (as root in
# CI, through sudo elsewhere). Without it those tests fail rather than skip.
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver

cluster: $(VENV)/.ray-deps
	$(PY) cluster.py

test: $(VENV)/.test-deps $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(VENV)/.test-deps
	$(PY) bench/bench_overhead.py
	$(PY) bench/bench_clone.py
	$(PY) bench/bench_streaming.py
	$(PY) bench/bench_batching.py
	$(PY) bench/bench_underrun.py
	$(PY) bench/bench_host.py
	$(PY) bench/bench_step.py
	$(PY) bench/bench_text.py
	$(PY) bench/bench_codec.py
	$(PY) bench/bench_longform.py
	$(PY) bench/bench_stt.py
	$(PY) bench/bench_cluster.py
