# vitserve: the everyday commands. `make serve` and `make test` work on a fresh machine with Python 3.11.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch pins for local work: the small CPU build to serve; the build that torchvision (and so timm) needs, to test.
TORCH_SERVE ?= torch==2.13.0
TORCH_TEST ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install install-test serve test lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SERVE)
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_TEST)
	$(BIN)/pip install -q -e '.[dev,ray]'

serve: install
	$(BIN)/vit-serve

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install-test
	$(BIN)/pip install -q -e '.[dev,ray,bench]'
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.raw --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache dist build
