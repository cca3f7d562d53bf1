PYTHON ?= python

.PHONY: install test lint

install:
	PYTHON=$(PYTHON) EXTRAS=dev bash scripts/install.sh

## Install the package with its test tools, then lint and run the whole suite.
test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .
