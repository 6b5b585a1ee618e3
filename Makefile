# Set-up: `make install` then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (an unpinned torch pulls a multi-GB CUDA build); users may install any torch>=2.1.
TORCH ?= torch==2.13.0
EXTRAS ?= test,eval,ray,serve,onnx

.PHONY: install test bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"

test:
	$(PY) -m pytest -q

bench:
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
