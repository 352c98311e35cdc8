# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create .venv if it is missing and install into it what they run (the tests need more).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make demo` needs the project alone (its export step writes the original's .pth files without
# torch); the tests also need torch, TensorFlow, timm, transformers, open_clip's vocabulary...
DEMO_STAMP := $(VENV)/.lensjax-demo
STAMP := $(VENV)/.lensjax-installed
# Without bytecode compilation at install time (Python compiles what it imports, on first
# import): a fresh venv installs in about half the time.
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
	$(PIP_INSTALL) -e .
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
