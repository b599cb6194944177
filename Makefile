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

# Two test processes even on two cores: a whole-study test spends about half its time waiting on Ray
# (process starts, health checks, polling), which the other process fills (12 min against 18 in one).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2

run: $(STAMP)
	$(VENV)/bin/python -m scaling.run $(STUDY)

clean:
	rm -rf $(VENV) outputs
