# The two commands of the README:
#   make demo   set up a virtual environment and run the digits federation (8 sites)
#   make test   set up (with dev tools) and run ruff, mypy and the whole test suite
#   make test-fast  units and the contract suite only (no process or server tests), for the
#                   edit-test loop; make test still runs everything
#   make test-gpu  the GPU tests alone (marked gpu; skipped by make test without CUDA)
#   make bench  fedloom against the plain loop, Flower and OpenFL (each peer in its own
#               environment under bench/), writes bench/results/ and docs/benchmarks.md
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: demo browser test test-fast test-gpu lint typecheck pytest proto clean bench

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

test: $(VENV)/.dev browser lint typecheck pytest

# tests/test_dashboard.py drives a real headless Chromium: installed from the system's
# packages where it is missing and this is root with apt-get (CI: a fresh Debian 12);
# anywhere else the dashboard's browser test is skipped, with a line saying why.
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "no chromium (and not root with apt-get): the dashboard's browser test is skipped"; fi

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(VENV)/.dev
	$(BIN)/mypy src

# Two workers, one a core: three measured no faster on 2 cores (761 s of pytest against
# 733 s). A file's tests stay on one worker (--dist loadfile). PYTEST_WORKERS=0 runs it
# serially.
PYTEST_WORKERS ?= 2

pytest: $(VENV)/.dev
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

# The edit-test loop: tests marked process or server are left out (pyproject.toml).
test-fast: $(VENV)/.dev
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not process and not server"

# On a machine with a CUDA GPU (and torch built for it): tests/test_gpu.py's gpu tests.
test-gpu: $(VENV)/.dev
	$(BIN)/pytest -m gpu -v

# The peers live in their own environments: Flower pins protobuf below 7 (fedloom needs
# 7), OpenFL pins older grpcio and protobuf. torch is the same CPU build everywhere.
FLOWER := bench/.venv-flower
OPENFL := bench/.venv-openfl
BENCH_REPEATS ?= 3

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[torch,ray]'
	touch $@ $(VENV)/.demo

$(FLOWER)/.ready:
	$(PYTHON) -m venv $(FLOWER)
	$(FLOWER)/bin/python -m pip install -q --disable-pip-version-check \
		'flwr[simulation]==1.42.0' 'torch==2.13.0' scikit-learn numpy
	touch $@

# OpenFL where it installs: its Workflow API needs packages openfl does not declare (ray,
# dill, metaflow and the notebook tools metaflow imports), pinned to the versions of
# OpenFL's workflow_interface_requirements.txt. A failure leaves its rows out, nothing else.
$(OPENFL)/.ready:
	$(PYTHON) -m venv $(OPENFL)
	$(OPENFL)/bin/python -m pip install -q --disable-pip-version-check \
		'openfl==1.9' 'torch==2.13.0' scikit-learn 'dill==0.3.6' 'metaflow==2.7.15' \
		'ray==2.43.0' 'tabulate==0.9.0' 'nbformat==5.10.4' 'nbdev==2.3.37' \
		'execnb==0.1.14' 'fastcore==1.8.0' 'setuptools<81'
	touch $@

bench: $(VENV)/.bench $(FLOWER)/.ready
	-$(MAKE) $(OPENFL)/.ready
	$(BIN)/python bench/run.py --repeats $(BENCH_REPEATS)
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/ray_backend.py
	$(BIN)/python bench/report.py

# Regenerate the protobuf code after editing src/fedloom/transport/proto/fedloom.proto.
proto: $(VENV)/.dev
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --pyi_out=src \
		src/fedloom/transport/proto/fedloom.proto

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache $(FLOWER) $(OPENFL)
