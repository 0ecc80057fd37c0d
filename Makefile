# The two commands of the README: `make serve` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= deploy/configs/local-cpu.yaml
PYTEST_ARGS ?=

.PHONY: serve test test-unit install install-test prepare check-deploy bench clean

serve: install prepare
	$(VENV)/bin/qwen-serve serve --config $(CONFIG)

test: install-test prepare
	$(PY) -m pytest -ra --durations=20 $(PYTEST_ARGS)

test-unit: install-test
	$(PY) -m pytest -ra -m "not stack" $(PYTEST_ARGS)

install:
	bash scripts/install.sh $(VENV)

install-test:
	bash scripts/install.sh $(VENV) --test

prepare:
	$(VENV)/bin/qwen-serve model prepare

check-deploy: install-test
	bash deploy/check.sh

clean:
	rm -rf $(VENV) build *.egg-info
