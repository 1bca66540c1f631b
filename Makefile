# One-command set-up + run. `make test` / `make perf` work on a fresh Linux machine with
# Python >= 3.10: they create .venv (seeing the system's packages, so a CUDA torch already
# installed on a GPU box is used as it is), install torch only if none is importable
# (TORCH_SPEC, default torch==2.13.0), then this package with its test and perf extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

# pytest processes (pytest-xdist): CI has 2 cores and the interpreter keeps one busy per
# process. --dist loadfile gives each file to one process, so a module's fixtures (the
# kernel report's compiles) run once. TEST_PROCS=1 runs the suite in this process.
TEST_PROCS ?= 2
PYTEST_ARGS = -q $(if $(filter 1,$(TEST_PROCS)),,-n $(TEST_PROCS) --dist loadfile) tests

# The oldest supported pair, the one the GPU image has: torch 2.11 with triton 3.6. Triton
# 3.6's interpreter turns 1-element arrays into ints with int(), which numpy >= 2.4 refuses
# (fixed in triton 3.8), hence numpy < 2.4 there.
OLDEST_SPEC ?= torch==2.11.0 triton==3.6.0 'numpy<2.4'
OLDEST_VENV ?= .venv-oldest

.PHONY: test perf setup clean test-oldest

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,perf]"
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

perf: setup
	$(PY) perf/report.py

test-oldest:
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install $(OLDEST_SPEC)
	$(OLDEST_VENV)/bin/python -m pip install -e ".[test,perf]"
	$(OLDEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info
