# Two commands do all set-up on a fresh machine (see README.md):
#   make quickstart   creates .venv, installs hpo, runs the digits quickstart study on SQLite
#   make test         creates .venv, installs hpo with its test tools and the system packages the
#                     tests drive (Chromium, docker-compose), then runs lint, types and the tests
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STORAGE ?= sqlite:///storage/hpo.db

.PHONY: quickstart test lint typecheck pytest system-deps dashboard clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install when the dependencies change; the stamp records the last install. constraints.txt
# holds the tested versions (the same numbers and lint rules on every fresh clone).
$(VENV)/.installed-runtime: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.installed-runtime

# Refresh constraints.txt: the newest versions pyproject.toml allows, installed in a fresh venv and
# frozen (its header kept). Run `make test` on the result before committing it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip && .venv-lock/bin/pip install -q '.[dev]'
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | grep -v '^hpo\b'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-lock

quickstart: $(VENV)/.installed-runtime
	$(BIN)/hpo worker studies/digits_quickstart.yaml --storage $(STORAGE)
	$(BIN)/hpo status digits_quickstart --storage $(STORAGE)
	@echo
	@echo "Watch it (live while workers run):  $(BIN)/hpo dashboard --storage $(STORAGE)"
	@echo "  then open http://127.0.0.1:8080 in a browser."

dashboard: $(VENV)/.installed-runtime
	$(BIN)/hpo dashboard --storage $(STORAGE)

# The browser and compose tests drive Debian's chromium, docker-compose and podman; installing them
# needs root (CI runs as root). Without root the tests that need them skip locally with a reason.
system-deps:
	@if [ "$$(id -u)" = 0 ]; then bash scripts/ci-browser.sh && bash scripts/ci-compose.sh && bash scripts/ci-podman.sh; \
	else echo "not root: skipping apt-get install of chromium/docker-compose/podman"; fi

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy hpo objectives

pytest: $(VENV)/.installed-dev system-deps
	$(BIN)/pytest -q -ra --durations=30 $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) storage/hpo.db* storage/checkpoints storage/artifacts
