# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned explicitly: a range would pull a multi-GB CUDA build here.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,demo,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/outcore demo

# Bytecode for the many child processes the tests start: an environment with
# PYTHONDONTWRITEBYTECODE=1 (as here) would compile outcore again in every one.
# Two pytest workers, a test file each at a time, one torch thread each (tests/conftest.py):
# much of a test's time is Python on one core, so two of them keep both cores busy.
test: $(STAMP)
	$(PY) -m compileall -q src benchmarks tests > /dev/null
	$(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build src/*.egg-info
