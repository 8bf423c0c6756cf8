# Quick start: `make run` (demo daemon) and `make test` (whole suite). Both set up on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: setup system-deps run test unit bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

system-deps:
	sh scripts/install-system-deps.sh

setup: $(VENV)/.installed

run: setup
	$(PY) -m mailcloak.demo

test: setup system-deps
	$(PY) -m pytest -q -rs

unit: setup
	$(PY) -m pytest -q tests/unit

# Benchmarks side by side with a plain-asyncio floor (bench/README.md); not part of `make test`.
bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) run *.egg-info
