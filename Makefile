# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned explicitly: a range would pull a multi-GB CUDA build here. Every
# install below names it, so that no dependency can move it.
TORCH := torch==2.13.0

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile '$(TORCH)'
	# The rest through uv, which resolves and downloads in parallel (10 s against pip's
	# 59 s here) and keeps the torch above; through pip if uv cannot (an index or a
	# proxy only pip is configured for).
	( $(PY) -m pip install -q --no-compile uv && \
	  $(VENV)/bin/uv pip install -q --no-cache --python $(PY) -e '.[test,demo,bench]' '$(TORCH)' ) || \
	  $(PY) -m pip install -q --no-compile -e '.[test,demo,bench]' '$(TORCH)'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/outcore demo

# Bytecode: pip installs without it (--no-compile), which saves about 80 s on a
# fresh machine, most of it for files nothing imports. Python writes the bytecode
# of a module when a process first imports it, and the many child processes of
# the tests and the demo reuse it. An environment with PYTHONDONTWRITEBYTECODE=1
# (as here) would forbid that and compile torch again in every process (3.6 s
# more per `import torch`), so make's commands run without it.
unexport PYTHONDONTWRITEBYTECODE

# Two pytest workers, a test file each at a time, one torch thread each (tests/conftest.py):
# much of a test's time is Python on one core, so two of them keep both cores busy.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build src/*.egg-info
