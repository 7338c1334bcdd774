# Each target creates .venv when it is missing. torch is pinned first to the CPU build
# that this project's CI machines carry on disk (torch==2.13.0 resolves to it there);
# on a GPU machine the same pin pulls the normal CUDA build from PyPI.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: venv lint test test-slow demo bench bench-gpu clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# ruff's settings are in pyproject.toml; a lint error fails `make test` before any test runs.
lint: venv
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

demo: venv
	$(BIN)/t5g2 demo

# The two CPU workloads the decode issues are measured on: summarize, and longtail (rows of different lengths).
bench: venv
	$(BIN)/t5g2 bench --shape tiny --workload summarize --compare-hf
	$(BIN)/t5g2 bench --shape tiny --workload longtail --rows 600 --scale 1 --repeats 3 --compare-hf

# The one-shot device check (jobs/bench_gpu.py): needs only torch and transformers, so it creates
# no venv and installs nothing (a bare GPU box has no package index); it uses .venv when present.
BENCH_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
bench-gpu:
	PYTHONPATH=. $(BENCH_PY) -m jobs.bench_gpu $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
