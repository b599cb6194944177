# `make test` and `make run` set up .venv on first use (and again whenever pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
STUDY ?= studies/gflops_sweep.yaml

.PHONY: test run venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install -e ".[dev]"
	touch $(STAMP)

# Three test processes even on two cores: a whole-study test spends about half its time waiting on Ray
# (process starts, health checks, polling), which the others fill (on the AVX2 2-core box, 2026-12-03:
# 14:19 against 16:30 with two processes; 18 min in one, earlier). One test handed out at a time as a process frees
# up (xdist's default hands each a run of consecutive tests): the longest ones, first in the collection
# (tests/conftest.py), then go to three processes, not one.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 3 --maxschedchunk 1

run: $(STAMP)
	$(VENV)/bin/python -m scaling.run $(STUDY)

# The venv only: outputs/ and reports/ hold studies' results, which no make target deletes.
clean:
	rm -rf $(VENV)
