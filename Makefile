# `make test` and `make demo` set everything up on a fresh machine (Python >= 3.11 + network access to PyPI/Debian).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= demo_workdir
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=
ABLATION_WORKDIR ?= ablation_workdir
ABLATION_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test lint format demo ablation fashion-mnist install install-torch clean-venv check-python

# The interpreter that will run everything: the venv's once it exists, else the one that creates it.
PYTHON_CHECK := import sys; v = sys.version.split()[0]; sys.exit(0 if sys.version_info >= (3, 11) else \
	f"make: Python {v} found at {sys.executable}; sfd_jax needs >= 3.11 " \
	"(run e.g. make test PYTHON=python3.11, or make clean-venv first if .venv was made with an older Python)")

check-python:
	@if [ -x $(PY) ]; then $(PY) -c '$(PYTHON_CHECK)'; \
	else command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; sfd_jax needs Python >= 3.11"; exit 1; }; \
		$(PYTHON) -c '$(PYTHON_CHECK)'; fi

# uv (the release launch/install.sh pins) installs the same pinned set as pip, with pip's package sources
# (launch/pip_sources_for_uv.py), and byte-compiles it on every core. The .pyc files are needed: machines that set
# PYTHONDONTWRITEBYTECODE=1 would otherwise recompile jax, flax and torch from source in every process. Where uv
# cannot be installed or fails, pip does the install (INSTALLER=pip: pip only). A fresh venv on 2 cores, uv's cache
# empty: 31 s, against 72 s for pip and compileall. A file that does not compile (torch ships one written for Python
# 3.12) is skipped.
INSTALLER ?= uv
UV_VERSION := $(shell sed -n 's/^SFD_UV_VERSION="\(.*\)"$$/\1/p' launch/common.sh)

$(VENV)/.installed: requirements.txt requirements-torch.txt | check-python
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && $(PY) -m pip install -q "uv==$(UV_VERSION)" \
		&& $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) $$($(PY) launch/pip_sources_for_uv.py) \
			-r requirements.txt -r requirements-torch.txt; then \
		echo "make: installed with uv $(UV_VERSION)"; \
	else \
		[ "$(INSTALLER)" = uv ] && echo "make: uv could not install the requirements; installing with pip"; \
		$(PY) -m pip install -q --no-compile -r requirements.txt -r requirements-torch.txt \
			&& { $(PY) -m compileall -qq -j 0 $(VENV)/lib || true; }; \
	fi
	touch $@

install: check-python $(VENV)/.installed

test: install fashion-mnist
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu FASHION_MNIST=$(FASHION_MNIST) \
		$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests $(PYTEST_ARGS)

# ruff (settings in pyproject.toml): lint, and check that the tree is formatted; `make format` formats it.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .

# The whole pipeline on Fashion-MNIST (docs/demo.md). Re-running resumes: finished stages are skipped.
demo: install fashion-mnist
	$(PY) -m sfd_jax.main --config=configs/demo.py --workdir=$(WORKDIR) --mode=demo \
		--config.demo.data_dir=$(FASHION_MNIST) $(DEMO_ARGS)

# The paper's ablations at CPU scale on the demo's data (docs/ablation.md): every setting × 3 seeds, resumable.
ablation: install fashion-mnist
	$(PY) -m sfd_jax.main --config=configs/ablation.py --workdir=$(ABLATION_WORKDIR) --mode=ablation \
		--config.demo.data_dir=$(FASHION_MNIST) $(ABLATION_ARGS)

# The Debian package dataset-fashion-mnist holds the four IDX files; elsewhere put them in FASHION_MNIST yourself.
fashion-mnist:
	@if [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] && [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte ]; then \
		if [ "$(FASHION_MNIST)" = /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] \
				&& command -v apt-get >/dev/null 2>&1; then \
			echo "Fashion-MNIST missing: apt-get install dataset-fashion-mnist"; \
			apt-get install -y dataset-fashion-mnist \
				|| { apt-get update && apt-get install -y dataset-fashion-mnist; }; \
		fi; \
	fi
	@if [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] && [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte ]; then \
		echo "error: Fashion-MNIST not found in $(FASHION_MNIST)."; \
		echo "  Debian/Ubuntu (as root): apt-get install dataset-fashion-mnist"; \
		echo "  Elsewhere: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and"; \
		echo "  t10k-labels-idx1-ubyte.gz (from github.com/zalandoresearch/fashion-mnist) in a directory DIR and run"; \
		echo "  make demo FASHION_MNIST=DIR (or make test FASHION_MNIST=DIR)"; \
		exit 1; \
	fi

clean-venv:
	rm -rf $(VENV)
