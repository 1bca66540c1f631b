# One-command set-up + run. `make test` / `make perf` work on a fresh Linux machine with
# Python >= 3.10: they create .venv (seeing the system's packages, so a CUDA torch already
# installed on a GPU box is used as it is), install torch only if none is importable
# (TORCH_SPEC, default torch==2.13.0), then this package with its test and perf extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: test perf setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,perf]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

perf: setup
	$(PY) perf/report.py

clean:
	rm -rf $(VENV) build *.egg-info
