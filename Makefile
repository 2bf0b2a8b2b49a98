# Wan2.2 text-to-video on Triton Inference Server. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
MODEL ?= tiny
DEPLOYMENT ?= model_repository/deployments/cpu.yaml
REPO ?= out/model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# Seconds a stopping server gives the requests under way before it unloads (then +5 s, and it is killed).
EXIT_TIMEOUT_S ?= 30
PYTEST_ARGS ?=
# The offline bundle for a GPU host without registry access (docs/gpu-hosts.md): its folder, the host's Python, and
# the optional attention-kernel add-ons (flash4, flash3).
GPU_BUNDLE ?= .gpu-bundle
GPU_PYTHON ?= 3.12
KERNELS ?=

.PHONY: help setup build serve run test test-fast test-unit test-multiprocess test-server test-gpu test-bench test-platform lint clean \
	gpu-bundle

help:
	@echo "make setup                  create $(VENV) with everything (PyPI)"
	@echo "make build MODEL=<dir|tiny> DEPLOYMENT=<yaml> REPO=<dir>"
	@echo "                            export graphs, check them against PyTorch, render the model repository"
	@echo "make serve REPO=<dir> [HTTP_PORT=8000 GRPC_PORT=8001 METRICS_PORT=8002 EXIT_TIMEOUT_S=30]"
	@echo "                            run tritonserver in the foreground (Ctrl-C / SIGTERM stops it)"
	@echo "make run                    build the tiny default, serve it, generate out/sample.mp4, stop"
	@echo "make test                   the test suite, every tier (what CI runs; CPU; starts a real Triton server)"
	@echo "make test-fast              the unit tier but its ONNX exports: pure logic, in-process (under a minute)"
	@echo "make test-unit              the whole unit tier (tests/unit), ONNX exports included"
	@echo "make test-multiprocess      gloo worker groups of several processes (tests/multiprocess)"
	@echo "make test-server            every test against the real Triton server (-m server)"
	@echo "make test-gpu               CUDA only (tests/gpu); skipped without a CUDA device"
	@echo "make test-bench             the benchmark scripts and tools (tests/bench)"
	@echo "make test-platform          deployment around the server: HAProxy replicas, stopping, Prometheus, Grafana, Kubernetes"
	@echo "                            PYTEST_ARGS=... is passed to pytest by every test target"
	@echo "make lint                   ruff, and the library's import layers (lint-imports)"
	@echo "make gpu-bundle [KERNELS=\"flash4 flash3\"] [GPU_PYTHON=3.12]"
	@echo "                            pack $(GPU_BUNDLE)/ for a GPU host without registry access (docs/gpu-hosts.md)"

# With VPY set to an environment that is already complete (a GPU host's: docs/gpu-hosts.md), nothing is installed.
setup: $(if $(filter $(VENV)/bin/python,$(VPY)),$(VENV)/.installed)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build this project tests with.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	# The Triton server binary and Python backend ship inside this wheel; its own Python deps are not needed.
	$(VPY) -m pip install -q --no-deps nvidia-pytriton==0.7.0
	touch $@

build: setup
	$(VPY) -m wan_build --model $(MODEL) --deployment $(DEPLOYMENT) --repo $(REPO)

serve: setup
	$(VPY) -m wan_triton.tritonserver.server --repo $(REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
		--metrics-port $(METRICS_PORT) --exit-timeout-s $(EXIT_TIMEOUT_S)

run: build
	$(VPY) -m wan_triton.tritonserver.launch --repo $(REPO) --output out/sample.mp4

# The tests that start Triton servers (marked `server`: tests/conftest.py) run in one pytest process, one server at
# a time, while a second process runs the rest beside it, with the one small server marked `beside_session_server`
# (its report follows when both are done; exit status 5, "no tests collected", is a pass for a PYTEST_ARGS
# selection that leaves one part empty). Then the tests that start replicas of their own, after the first run's
# session server (every test rendering loaded) has stopped: beside it they would overfill a 24 GB machine.
TEST_TMP ?= out/pytest
SERVERS := server and not beside_session_server and not replicas
test: setup
	rm -rf $(TEST_TMP) && mkdir -p $(TEST_TMP)
	$(VPY) -m pytest -q -m "not ($(SERVERS)) and not replicas" --basetemp=$(TEST_TMP)/rest $(PYTEST_ARGS) \
		> $(TEST_TMP)/rest.log 2>&1 & rest=$$!; \
	$(VPY) -m pytest -q -m "$(SERVERS)" --basetemp=$(TEST_TMP)/servers $(PYTEST_ARGS); servers=$$?; \
	wait $$rest; rest=$$?; echo "--- the other tests, run beside them:"; cat $(TEST_TMP)/rest.log; \
	for status in $$servers $$rest; do test $$status -eq 0 || test $$status -eq 5 || exit 1; done
	$(VPY) -m pytest -q -m replicas --basetemp=$(TEST_TMP)/replicas $(PYTEST_ARGS); status=$$?; \
	test $$status -eq 0 || test $$status -eq 5

# The tiers are tests/<tier>/ folders and markers of the same names (tests/conftest.py).
test-fast: setup
	$(VPY) -m pytest -q tests/unit -m "not slow" $(PYTEST_ARGS)

test-unit test-multiprocess test-gpu test-bench test-platform: test-%: setup
	$(VPY) -m pytest -q tests/$* $(PYTEST_ARGS)

test-server: setup
	$(VPY) -m pytest -q -m server $(PYTEST_ARGS)

lint: setup
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VENV)/bin/lint-imports

gpu-bundle:
	GPU_PYTHON=$(GPU_PYTHON) PYTHON=$(PYTHON) bash tools/gpu_bundle/pack.sh $(GPU_BUNDLE)
	for kernel in $(KERNELS); do \
		GPU_PYTHON=$(GPU_PYTHON) PYTHON=$(PYTHON) bash tools/gpu_bundle/pack_kernel.sh $$kernel $(GPU_BUNDLE) || exit 1; \
	done

clean:
	rm -rf out artifacts
