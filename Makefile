# The two commands: `make run` (set up, demo data, materialise everything) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR := data
DEMO_STAMP := $(DEMO_DIR)/.demo-ready
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: setup run test ui instance demo-data bench clean

setup: $(STAMP)

# torch==2.13.0 first: it resolves to the local CPU build, so no range pulls CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,faces]'
	touch $(STAMP)

$(DEMO_STAMP): $(STAMP)
	$(PY) -m cv_assets.cli demo-data $(DEMO_DIR)
	touch $(DEMO_STAMP)

demo-data: $(DEMO_STAMP)

# The project's instance config (dagster.yaml) in DAGSTER_HOME, for `make run` and `make ui` alike
# (no telemetry, concurrency limits, run monitoring). An edited dagster.yaml is copied again.
$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

instance: $(DAGSTER_HOME)/dagster.yaml

run: $(DEMO_STAMP) instance
	$(PY) -m cv_assets.cli run-demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2  # two workers: the suite waits on servers and child processes as much as on the CPU

# The Dagster UI (`dg dev`, webserver + daemon) and, beside it, the HTML reports over http at
# storage.reports_base_url (browsers refuse file:// links from the UI); both stop together.
ui: $(DEMO_STAMP) instance
	$(PY) -m cv_assets.cli serve-reports & reports=$$!; trap 'kill $$reports 2>/dev/null' EXIT INT TERM; \
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/dg dev

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf data/* .dagster_home/* .pytest_cache
