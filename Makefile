# Two commands on a machine with only python3:
#   make demo   builds .venv and runs the main job
#   make test   builds .venv with the test extra and runs the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test parity bench study clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The main job: train the 2D phantom demo (resumes, or returns at once, if runs/demo holds a finished run).
demo: $(STAMP)
	$(PY) train.py --config configs/default.py --workdir runs/demo

test: $(TEST_STAMP)
	$(PY) -m pytest tests

# The loss parity report against the PyTorch reference and MONAI (needs the test extra).
parity: $(TEST_STAMP)
	$(PY) -m combo_jax.parity

bench: $(TEST_STAMP)
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/input_pipeline.py

# The loss study of docs/results.md: the phantom (5 seeds per setting) and the CT sample (3 seeds), one training
# at a time; about 4 hours on 2 CPU cores; resumes if interrupted. scripts/study.sh --gpu runs it on a GPU machine.
study: $(STAMP)
	scripts/study.sh --python $(PY) results
	$(PY) scripts/results_tables.py --results results --out docs/results_tables.md

clean:
	rm -rf $(VENV)
