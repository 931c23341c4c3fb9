# Two entry points: `make demo` and `make test`. Both create .venv and install what they need;
# torch 2.13.0 (CPU) is pinned explicitly so that pip never picks another (multi-GB) build.
PY      ?= python3
VENV    := .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv demo hf test test-all bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PYTHON) examples/demo.py

hf: $(STAMP)
	$(PYTHON) examples/hf_models.py --codegen eager

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

test-all: $(STAMP)
	$(PYTHON) -m pytest -q tests --runslow

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/bench_step.py --threads 1

clean:
	rm -rf $(VENV) build *.egg-info
