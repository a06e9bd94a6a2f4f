# The two commands of the README:
#   make demo   set up a virtual environment and run the digits federation (8 sites)
#   make test   set up (with dev tools) and run ruff, mypy and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: demo test lint typecheck pytest proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[torch]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[torch,dev]'
	touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	rm -rf demo
	$(BIN)/fedloom init demo --template digits
	$(BIN)/fedloom simulate demo --sites 8 --partition dirichlet:0.3 --strategy fedavg \
		--baseline --run-name demo
	@echo "summary: demo/runs/demo/summary.json   plot: demo/runs/demo/accuracy.png"

test: $(VENV)/.dev lint typecheck pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(VENV)/.dev
	$(BIN)/mypy src

pytest: $(VENV)/.dev
	$(BIN)/pytest

# Regenerate the protobuf code after editing src/fedloom/transport/proto/fedloom.proto.
proto: $(VENV)/.dev
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --pyi_out=src \
		src/fedloom/transport/proto/fedloom.proto

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache
