# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# pytest workers: the suite is CPU-bound and XLA compiles are single-threaded.
TEST_WORKERS ?= 2

.PHONY: venv test demo bench clean

# Idempotent: reinstalls only when setup.py changes.
$(VENV)/.installed: setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

demo: venv
	$(PY) -m rlhf_jax.train --config configs/demo.py --workdir $(DEMO_DIR)

bench: venv
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/compare.py

clean:
	rm -rf $(VENV) runs
