# sslrun: set-up, demo and tests on a fresh Debian machine. `make demo` and `make test` both do all set-up first:
# apt packages when missing, .venv when missing, torch 2.14.1 + the project (editable, with dev extras) when
# pyproject.toml changed. Re-running them is fast: nothing is reinstalled when nothing changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.sslrun-installed
APT_PKGS := libturbojpeg0-dev libopencv-dev pkg-config dataset-fashion-mnist chromium
TORCH := torch==2.14.1 torchvision==0.29.1
# Ray must stay on loopback: run it in a network namespace that has only `lo` (root), never posting usage statistics.
NETNS := unshare -n sh -c
NETNS_ENV := ip link set lo up; export GLOO_SOCKET_IFNAME=lo RAY_USAGE_STATS_ENABLED=0;
# Each `make demo` writes a fresh run directory (runs/demo/<date-time>), so it can be run again and again.
DEMO_OUT ?= runs/demo/$$(date +%Y%m%d-%H%M%S)
DEMO_ARGS ?= --method simclr --encoder small_cnn --dataset fashion-mnist --workers-per-node 2 --epochs 1 \
	--batch-size 256 --output $(DEMO_OUT)

.PHONY: setup apt demo test lint clean
setup: apt $(STAMP)

apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "error: missing system packages:$$missing; install them with: sudo apt-get install -y$$missing (then re-run make)" >&2; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: sslrun needs Python >= 3.11; run with PYTHON=/path/to/python3.11" >&2; exit 1; }
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV) || \
	  { echo "error: could not create $(VENV); install python3-venv (apt-get install -y python3-venv)" >&2; exit 1; }
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $(STAMP)

# The main job on the embedded default: local Ray, 2 CPU workers (gloo DDP), real Fashion-MNIST, small CNN.
demo: setup
	@if [ "$$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then \
	  $(NETNS) '$(NETNS_ENV) $(VENV)/bin/sslrun launch $(DEMO_ARGS)'; \
	else \
	  RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/sslrun launch $(DEMO_ARGS); \
	fi

# The whole test suite (slow multi-process tests included), Ray on loopback only.
test: setup
	@if [ "$$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then \
	  $(NETNS) '$(NETNS_ENV) $(VENV)/bin/pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)'; \
	else \
	  echo "note: not root or no unshare: running the tests without a loopback-only namespace" >&2; \
	  GLOO_SOCKET_IFNAME=lo RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS); \
	fi

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache build *.egg-info
