# Two commands do everything: `make train` and `make test` (each sets up .venv first if needed).
PYTHON ?= python3.12
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train test test-slow test-gpu setup clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

# Trains the `tiny` preset on the built-in default data (the Python standard library source).
train: $(STAMP)
	$(BIN)/spjax train configs/tiny.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# On a GPU machine: the tests marked gpu (kernels against their references on the device).
test-gpu: $(STAMP)
	JAX_PLATFORMS=cuda $(BIN)/python -m pytest -q -m gpu $(ARGS)

clean:
	rm -rf $(VENV) runs
