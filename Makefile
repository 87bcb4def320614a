# xent_jax: every target creates .venv and installs what it needs by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUNS ?= runs

.PHONY: run test lint docs format bench bench-quick bench-fused clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the package metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test,research]"
	touch $(STAMP)

## make run: the main job — research scripts on their default configs, report in runs/latest/.
run: $(STAMP)
	$(PY) -m research.run_all --runs_dir $(RUNS)

## make test: the whole suite (doctests included), in parallel on the available cores.
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile -q

## make lint: ruff, then pyright (basic mode, [tool.pyright] in pyproject.toml) on the library.
lint: $(STAMP)
	$(PY) -m ruff check xent_jax research configs tests docs
	$(PY) -m ruff format --check xent_jax research configs tests docs
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(VENV)/bin/pyright  # no look-up of newer releases: offline

## make docs: the documentation site (examples executed) in docs/_build/html; warnings are errors.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -n -b html -d docs/_build/doctrees docs docs/_build/html

format: $(STAMP)
	$(PY) -m ruff format xent_jax research configs tests docs
	$(PY) -m ruff check --fix xent_jax research configs tests docs

## make bench: the full benchmark; make bench-quick: the same harness, small (< 2 min on 2 CPU cores).
## make bench-fused: the fused linear loss against materialising x @ w, at the shapes of its bars.
bench: $(STAMP)
	$(PY) -m research.benchmark --config configs/benchmark.py

bench-quick: $(STAMP)
	$(PY) -m research.benchmark --config configs/benchmark.py:quick

bench-fused: $(STAMP)
	$(PY) -m research.benchmark --config configs/benchmark.py:fused

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build
