# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# pytest workers: the suite is CPU-bound and XLA compiles are single-threaded.
TEST_WORKERS ?= 2
BENCH_JSON ?= runs/bench/compare.json
BENCH_ARGS ?=

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

# rlhf_jax vs. PyTorch / HF / TRL side by side; results also as JSON for
# BENCHMARKS.md. Extra flags: make bench BENCH_ARGS="--only ppo --repeats 3".
bench: venv
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/compare.py --json $(BENCH_JSON) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs
