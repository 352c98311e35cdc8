# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create .venv if it is missing and install into it what they run (the tests need more).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make demo` needs the project and torch (its export step writes the original's .pth files);
# the tests also need TensorFlow, timm, transformers, open_clip's vocabulary and the rest.
DEMO_STAMP := $(VENV)/.lensjax-demo
STAMP := $(VENV)/.lensjax-installed
# Without bytecode compilation at install time (Python compiles what it imports, on first
# import): a fresh venv installs in half the time (1.5 min instead of 2.6 for the demo's).
PIP_INSTALL := $(PY) -m pip install --no-compile
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist; most of a test's time is XLA compiling,
# which uses one core); 1 runs them in this process.
PYTEST_JOBS ?= 2

.PHONY: demo forgetting test lint install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PIP_INSTALL) -e '.[bridge]'
	touch $@

$(STAMP): pyproject.toml | $(PY)
	$(PIP_INSTALL) -e '.[bridge,test]'
	touch $@ $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) experiments/demo.py

# Fine-tuning without forgetting: plain, mixed, LoRA, EWC, LoRA + mixed (BENCHMARKS.md).
forgetting: $(STAMP)
	$(PY) experiments/forgetting.py

test: $(STAMP)
	$(PY) -m ruff check lensjax bridge experiments tests
	$(PY) -m pytest $(if $(filter-out 1,$(PYTEST_JOBS)),-n $(PYTEST_JOBS) --dist loadfile) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_out forgetting_out
