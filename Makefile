# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup demo test lint brokers brokers-stop bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(BIN)/python examples/demo.py

brokers: setup
	.ci/brokers.sh start

brokers-stop:
	.ci/brokers.sh stop

test: setup brokers
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check streamflow connectors tests benchmarks examples
	$(BIN)/mypy

bench: setup brokers
	$(BIN)/python benchmarks/hop.py
	$(BIN)/python benchmarks/pipeline_inference.py
	$(BIN)/python benchmarks/pipeline_training.py
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/kafka_throughput.py
	$(BIN)/python benchmarks/windows.py
	$(BIN)/python benchmarks/checkpoints.py

clean: brokers-stop
	rm -rf $(VENV) .brokers .pytest_cache .mypy_cache
