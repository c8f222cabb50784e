# Two commands on a fresh machine (python3 >= 3.11, make, git):
#   make demo   install into .venv, then train CE / LWS / SSD on the embedded dataset and print the table
#   make test   install into .venv (with test extras), then run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-oldest-torch bench clean

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

# The suite on the oldest torch we support, the GPU machine's (torch 2.11 / torchvision 0.26), in its own venv.
OLDEST := $(VENV)-oldest-torch
test-oldest-torch:
	$(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q torch==2.11.0 torchvision==0.26.0
	grep -v -E '^(torch|torchvision)==' requirements.lock > $(OLDEST)/constraints.txt
	$(OLDEST)/bin/python -m pip install -q -c $(OLDEST)/constraints.txt -e ".[test]"
	PATH="$(abspath $(OLDEST)/bin):$$PATH" OMP_NUM_THREADS=2 $(OLDEST)/bin/python -m pytest

bench: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) $(OLDEST) runs
