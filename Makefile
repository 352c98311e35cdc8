# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create .venv if it is missing and install the project with what its tests need.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lensjax-installed
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist; most of a test's time is XLA compiling,
# which uses one core); 1 runs them in this process.
PYTEST_JOBS ?= 2

.PHONY: demo forgetting test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[bridge,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) experiments/demo.py

# Fine-tuning without forgetting: plain, mixed, LoRA, EWC, LoRA + mixed (BENCHMARKS.md).
forgetting: $(STAMP)
	$(PY) experiments/forgetting.py

test: $(STAMP)
	$(PY) -m ruff check lensjax bridge experiments tests
	$(PY) -m pytest $(if $(filter-out 1,$(PYTEST_JOBS)),-n $(PYTEST_JOBS) --dist loadfile) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_out forgetting_out
