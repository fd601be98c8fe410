# Two commands on a machine with only python3:
#   make demo   builds .venv and runs the main job
#   make test   builds .venv with the test extra and runs the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test parity bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The parity report needs the PyTorch references, so the demo uses the test environment.
demo: $(TEST_STAMP)
	$(PY) -m combo_jax.parity

test: $(TEST_STAMP)
	$(PY) -m pytest tests

parity: demo

bench: $(TEST_STAMP)
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV)
