# On a fresh machine with python3 and pip: `make test` or `make train` does everything.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch. A bare "torch" would pull a multi-GB CUDA build; override for a GPU box,
# e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
TORCH_SPEC ?= torch==2.13.0
# hf: the suite tests TextGenerator over Hugging Face models and the GPT-2 import/export, so CI must
# have transformers (no skip).
EXTRAS ?= dev,hf
PY := $(VENV)/bin/python
STAMP := $(VENV)/.craftfn-installed
GIN ?= gin/char_gpt.gin
RUN_DIR ?= runs/char_gpt
# pytest-xdist workers: CI has 2 cores and the suite is mostly single-threaded Python (tracing,
# compiling), so two workers halve its wall time. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -n $(PYTEST_WORKERS)

.PHONY: venv test train lint bench mutate clean

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

train: $(STAMP)
	$(VENV)/bin/craftfn train --gin_file $(GIN) --run_dir $(RUN_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check craftfn tests benchmarks

# Plants known one-line bugs in a scratch copy and reports which the tests kill (slow; not in CI).
mutate: $(STAMP)
	$(PY) tests/mutation/mutate.py

bench: $(STAMP)
	$(PY) benchmarks/optim_bench.py --small

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
