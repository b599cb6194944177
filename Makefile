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

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

run: $(STAMP)
	$(VENV)/bin/python -m scaling.run $(STUDY)

clean:
	rm -rf $(VENV) outputs
