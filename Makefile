# The two quickstart targets work on a fresh machine with only python3:
#   make demo   -> makes .venv, installs mtlvision, trains the default multi-task model on built-in scenes
#   make test   -> makes .venv if needed, installs the dev extras, checks lint and types, builds the docs site
#                  (mkdocs --strict), runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to a pair that works together; override for another platform,
# e.g. `make demo TORCH="torch==2.9.1 torchvision==0.24.1"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test lint docs install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,export,serve,docs,tune]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mtlvision train scenes --name demo

test: lint docs
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# the documentation site, built into an ignored folder; --strict turns every warning into a failure
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir .site

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs preds .pytest_cache .site
