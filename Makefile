PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
PYTEST_ARGS ?=

.PHONY: install test test-slow test-gpu lint bench clean demo docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel

$(STAMP): pyproject.toml constraints/ci.txt | $(BIN)/python
	$(BIN)/python -m pip install -c constraints/ci.txt -e '.[dev]'
	touch $(STAMP)

$(DOCS_STAMP): pyproject.toml constraints/ci.txt | $(BIN)/python
	$(BIN)/python -m pip install -c constraints/ci.txt -e '.[dev,docs]'
	touch $(DOCS_STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-gpu: install
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

DEMO ?= runs/demo
DEMO_HOLDOUT ?= 75

# meta-train the default recipe on rotated digits (75 degrees held out), then meta-test it
# against tuned SGD, SGD-momentum, Adam and APO-Precond on the held-out domain; replaces $(DEMO)
demo: install
	rm -rf $(DEMO)/meta_train $(DEMO)/meta_test
	$(BIN)/python -m meta_train --learner metamd --suite rotated-digits \
		--holdout $(DEMO_HOLDOUT) --out $(DEMO)/meta_train
	$(BIN)/python -m meta_test --suite rotated-digits --domain $(DEMO_HOLDOUT) \
		--optimizers sgd,sgdm,adam,apo-precond,learned:$(DEMO)/meta_train/learned_optimizer.safetensors \
		--hpo grid --seeds 0,1,2 --steps 300 --out $(DEMO)/meta_test
	cat $(DEMO)/meta_test/report.md

# the documentation site (MkDocs + Material + mkdocstrings) into build/site: the results
# pages' tables are regenerated from docs/results/*.json first; warnings and broken links or
# references are errors (--strict)
docs: $(DOCS_STAMP)
	$(BIN)/python tools/results_pages.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir build/site

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
