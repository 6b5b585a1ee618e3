# Set-up: `make install` then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (an unpinned torch pulls a multi-GB CUDA build); users may install any torch>=2.1.
TORCH ?= torch==2.13.0
EXTRAS ?= test,eval,ray,serve,onnx

.PHONY: install install-onnx test bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"

# An environment that runs ONNX exports only (`--backend onnx`): no torch, no transformers.
install-onnx:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -e . && $(PY) -m pip install --quiet -r requirements-onnx.txt

test:
	$(PY) -m pytest -q

bench:
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
