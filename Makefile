# emofed: `make simulate` sets everything up and runs the default simulation;
# `make test` sets everything up and runs the test suite;
# `make lint` runs the linter and the type checker (as CI does, before the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.emofed-installed

.PHONY: setup simulate test test-all lint lock clean

setup: $(STAMP)

# The environment is rebuilt only when the lock or the project metadata change.
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else "emofed needs Python 3.11 or 3.12; set PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
	$(BIN)/uv pip install --python $(BIN)/python --quiet -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps -e .
	touch $(STAMP)

simulate: setup
	$(BIN)/emofed simulate $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# ruff and mypy read their settings (rule sets; files, strict on privacy/) from pyproject.toml.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Re-resolve pinned versions after changing dependencies in pyproject.toml.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info
