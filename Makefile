# The two set-up commands: `make demo` and `make test`. Each (re)creates .venv when it is missing or
# older than pyproject.toml, so a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: venv models demo test lint instance dev bench-extract bench-download bench-clip bench-orchestration

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	$(VENV)/bin/python -m pip install -q --no-deps $$($(VENV)/bin/python -c "import tomllib; t = tomllib.load(open('pyproject.toml', 'rb'))['tool']['laion_assets']; print(' '.join(t['install-no-deps'] + t['install-no-deps-dev']))")
	touch $(STAMP)

venv: $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME) && cp dagster.yaml $@

# The small offline CLIPs and heads: trained once (about 2.5 minutes on 2 cores), then a no-op.
models: $(STAMP)
	$(VENV)/bin/laion-assets small-models

demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml models
	$(VENV)/bin/laion-assets demo

test: $(STAMP) models
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

# The instance's storage, created by one process before any service starts: a daemon, its code server and a
# webserver that all find an empty DAGSTER_HOME can create it at once and leave two alembic heads ("Version table
# alembic_version has more than one head present", dagster issue #27390). A no-op on a current instance; after a
# Dagster upgrade, it migrates the schema.
instance: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster instance migrate > /dev/null

dev: instance
	$(VENV)/bin/dagster dev

bench-extract: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_extract.py

bench-download: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_download.py

bench-clip: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_clip.py

bench-orchestration: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_orchestration.py
