# radflow — make run · make test · make lint · make bench
# Every target does its own set-up on a fresh Debian machine: a venv with the
# workspace's packages, and (for tests) DCMTK from apt when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.radflow-installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PACKAGES := -e libs/core -e libs/devstack -e services/ingest -e services/transcode -e services/router -e services/stow-forwarder -e services/report-return
SRC := libs/core/src libs/devstack/src services/ingest/src services/transcode/src services/router/src services/stow-forwarder/src services/report-return/src

.PHONY: install system-deps run test lint bench schemas clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml libs/core/pyproject.toml libs/devstack/pyproject.toml services/ingest/pyproject.toml services/transcode/pyproject.toml services/router/pyproject.toml services/stow-forwarder/pyproject.toml services/report-return/pyproject.toml
	$(PIP) install -q --disable-pip-version-check $(PACKAGES) -e '.[dev]'
	touch $@

install: $(STAMP)

# DCMTK (storescu, echoscu, dcmcjpeg…) is a real DICOM sender for the tests; Orthanc
# with its DICOMweb plugin is the real destination (make run's example destination).
system-deps:
	@{ command -v storescu && command -v Orthanc && \
	   test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so; } >/dev/null 2>&1 || { \
	  echo "installing dcmtk, orthanc and orthanc-dicomweb with apt-get"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    dcmtk orthanc orthanc-dicomweb; }

run: install system-deps
	$(PY) -m radflow_devstack

test: install system-deps
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff format --check $(SRC) tests bench
	$(VENV)/bin/ruff check $(SRC) tests bench
	$(VENV)/bin/mypy $(SRC)

# Side-by-side benchmarks (see bench/README.md); needs DCMTK like the tests.
bench: install system-deps
	$(PY) bench/codecs.py

# Regenerate docs/events/*.schema.json from the event models.
schemas: install
	$(PY) -m radflow_core.schema docs/events

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
