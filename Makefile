# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast fuzz soak bench venv

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

## Classify the bundled example scans with the embedded default (SQLite, local workers) and print the report.
demo: $(STAMP)
	$(BIN)/python cli.py run examples/scans

## The whole suite, on the real Redis and PostgreSQL of this machine.
test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

fuzz: $(STAMP)
	BRAINSCAN_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest tests/test_fuzz_decode.py

## Full soak: 20,000 scans, two workers, private Redis/PostgreSQL, SIGKILL/Redis restart/PostgreSQL down/poison.
soak: $(STAMP)
	$(BIN)/python bench/soak.py --scans 20000

bench: $(STAMP)
	$(BIN)/python bench/model.py --precision auto,int8
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/batch.py
	$(BIN)/python bench/nightly.py
	$(BIN)/python bench/report.py
	$(BIN)/python bench/train_step.py
