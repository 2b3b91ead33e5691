# `make test` and `make demo` set everything up on a fresh machine (Python 3.11 + network access to PyPI/Debian).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= demo_workdir
PYTEST_ARGS ?=

.PHONY: test demo install install-torch clean-venv

$(VENV)/.installed: requirements.txt requirements-torch.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-torch.txt
	touch $@

install: $(VENV)/.installed

test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
		$(PY) -m pytest -q --durations=15 tests $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
