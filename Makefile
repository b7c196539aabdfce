# Two set-up commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch (a wheel that pip finds locally here; elsewhere pip downloads it from PyPI).
TORCH ?= torch==2.13.0

.PHONY: install dev run test lint bench

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .

dev:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'

run: install
	ccdrec run --dataset yelp

test: dev
	$(PYTHON) -m pytest -q

lint: dev
	ruff check src tests benchmarks

bench: install
	$(PYTHON) benchmarks/teacher_block0.py --dataset yelp
