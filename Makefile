# vitserve: the everyday commands. `make serve` and `make test` work on a fresh machine with Python 3.11, 3.12
# or 3.13 (the first of python3.11, python3.12, python3.13 found; `make PY=/path/to/python ...` picks another).
PY ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || echo python3.11)
# Two environments, so that the test tools never replace the torch that serves: .venv (make serve: torch's CPU
# build and vitserve) and .venv-test (make test / lint / bench: the torch build that torchvision, and so timm,
# needs, with the test extra).
VENV ?= .venv
TEST_VENV ?= .venv-test
BIN := $(VENV)/bin
TBIN := $(TEST_VENV)/bin
# The CPU-only build of torch (about 190 MB), from PyTorch's own index: a plain `pip install torch` from PyPI
# on Linux is the CUDA build (several GB). Its own requirements come from PyPI with vitserve's.
# `make serve TORCH_SERVE=torch==2.13.0 TORCH_INDEX=` takes PyPI's build instead.
TORCH_SERVE ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_TEST ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install install-test serve test lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(TBIN)/python:
	$(PY) -m venv $(TEST_VENV)
	$(TBIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install -q --no-deps $(TORCH_SERVE) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e .

install-test: $(TBIN)/python
	$(TBIN)/python -c "import torchvision" 2>/dev/null || $(TBIN)/pip install -q $(TORCH_TEST)
	$(TBIN)/pip install -q -e '.[dev,ray]'

serve: install
	$(BIN)/vit-serve

test: install-test
	@command -v chromium >/dev/null 2>&1 || echo "chromium not found: tests/http/test_page.py (the page and /docs in a browser) will skip; apt-get install chromium"
	$(TBIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(TBIN)/ruff check .
	$(TBIN)/ruff format --check .

format: install-test
	$(TBIN)/ruff format .
	$(TBIN)/ruff check --fix .

bench: install-test
	$(TBIN)/pip install -q -e '.[dev,ray,bench]'
	OMP_WAIT_POLICY=PASSIVE $(TBIN)/python -m bench.raw --quick

clean:
	rm -rf $(VENV) $(TEST_VENV) .pytest_cache .ruff_cache dist build
