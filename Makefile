# Two commands on a fresh machine (python3 >= 3.11, make, git):
#   make demo   install into .venv, then train CE / LWS / SSD on the embedded dataset and print the table
#   make test   install into .venv (with test extras), then run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[test]"
	-$(BIN)/python scripts/fetch_embedded_data.py
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/ltd demo

test: install
	PATH="$(abspath $(BIN)):$$PATH" OMP_NUM_THREADS=2 $(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
