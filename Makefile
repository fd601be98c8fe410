# Two commands on a machine with only python3:
#   make demo   builds .venv and runs the main job
#   make test   builds .venv with the test extra and runs the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test parity bench aot study clean

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
	$(PY) train.py --config default --workdir runs/demo

test: $(TEST_STAMP)
	$(PY) -m pytest tests

# The loss parity report against the PyTorch reference and MONAI (needs the test extra).
parity: $(TEST_STAMP)
	$(PY) -m combo_jax.parity

bench: $(TEST_STAMP)
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/input_pipeline.py

# The deviceless accelerator report (benchmarks/aot.py): compiles the losses and the U-Net train step for
# H100, H200, TPU v5e and v5p on this CPU, no device needed. Its own .venv-aot holds the CUDA PJRT plugin
# (jax[cuda12], at .venv's jax version) and libtpu (as jax[tpu] pins it): about 6.5 GB, never part of `make test`.
AOT_VENV := .venv-aot
AOT_PY := $(AOT_VENV)/bin/python
AOT_STAMP := $(AOT_VENV)/.installed
AOT_TARGETS ?= h100 h200 tpu-v5e tpu-v5p

$(AOT_STAMP): $(STAMP) pyproject.toml
	$(PYTHON) -m venv $(AOT_VENV)
	$(AOT_PY) -m pip install --quiet --upgrade pip
	$(AOT_PY) -m pip install --quiet -e '.[test]' \
		"jax[cuda12,tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $@

aot: $(AOT_STAMP)
	for target in $(AOT_TARGETS); do $(AOT_PY) benchmarks/aot.py --target $$target || exit 1; done

# The loss study of docs/results.md: the phantom (5 seeds per setting) and the CT sample (3 seeds), a training
# per core (at most 2); about 2 h 20 min on 2 CPU cores; resumes if interrupted. scripts/study.sh --gpu runs it on
# a GPU machine.
study: $(STAMP)
	scripts/study.sh --python $(PY) results
	$(PY) scripts/results_tables.py --results results --out docs/results_tables.md

clean:
	rm -rf $(VENV) $(AOT_VENV)
