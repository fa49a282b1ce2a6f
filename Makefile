# radflow — make run · make test · make lint · make bench
# Every target does its own set-up on a fresh Debian machine: a venv with the
# workspace's packages, and (for tests) DCMTK from apt when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.radflow-installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PACKAGES := -e libs/core -e libs/rules -e libs/codecs -e libs/devstack -e services/ingest -e services/transcode -e services/router -e services/stow-forwarder -e services/report-return -e services/ledger -e services/worklist
SRC := libs/core/src libs/rules/src libs/codecs/src libs/devstack/src services/ingest/src services/transcode/src services/router/src services/stow-forwarder/src services/report-return/src services/ledger/src services/worklist/src

.PHONY: install system-deps run test alert-tests lint bench faults schemas images image-contract dockerfiles constraints clean dashboard-images

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml libs/core/pyproject.toml libs/rules/pyproject.toml libs/codecs/pyproject.toml libs/devstack/pyproject.toml services/ingest/pyproject.toml services/transcode/pyproject.toml services/router/pyproject.toml services/stow-forwarder/pyproject.toml services/report-return/pyproject.toml services/ledger/pyproject.toml services/worklist/pyproject.toml
	$(PIP) install -q --disable-pip-version-check $(PACKAGES) -e '.[dev]'
	touch $@

install: $(STAMP)

# DCMTK (storescu, echoscu, dcmcjpeg…) is a real DICOM sender for the tests; Orthanc
# with its DICOMweb plugin is the real destination (make run's example destination).
# promtool (Debian package prometheus) unit-tests the shipped alert rules.
system-deps:
	@{ command -v storescu && command -v Orthanc && command -v promtool && \
	   test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so; } >/dev/null 2>&1 || { \
	  echo "installing dcmtk, orthanc, orthanc-dicomweb and prometheus with apt-get"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 \
	    dcmtk orthanc orthanc-dicomweb prometheus; }

# make run BROKER=durable keeps the broker's log in the S3 server, so Tansu can be
# killed and restarted without losing a record (default: in memory).
BROKER ?= memory
run: install system-deps
	@case "$(BROKER)" in memory|durable) ;; *) echo "BROKER must be memory or durable" >&2; exit 2;; esac
	$(PY) -m radflow_devstack $(if $(filter durable,$(BROKER)),--durable-broker)

test: install system-deps
	$(PY) -m pytest

# The alerts' unit tests (deploy/k8s/base/monitoring/tests) with promtool alone
# (docs/operations.md, "Testing the alerts"); make test runs them too.
ALERT_TESTS := deploy/k8s/base/monitoring/tests
RULES_FILE := $(PYTHON) libs/devstack/src/radflow_devstack/prometheus_rules.py deploy/k8s/base/monitoring/alerts.yaml $(ALERT_TESTS)/rules.yaml
alert-tests:
	$(RULES_FILE)
	promtool check rules $(ALERT_TESTS)/rules.yaml
	$(RULES_FILE) --annotation summary
	promtool test rules $(ALERT_TESTS)/test_*.yaml

lint: install
	$(VENV)/bin/ruff format --check $(SRC) tests bench deploy/images deploy/monitoring
	$(VENV)/bin/ruff check $(SRC) tests bench deploy/images deploy/monitoring
	$(VENV)/bin/mypy $(SRC) deploy/images
	$(VENV)/bin/mypy deploy/monitoring

# Side-by-side benchmarks (see bench/README.md); needs DCMTK and Orthanc like the
# tests. About 30 minutes on 2 cores; run it on a quiet machine. Results in
# bench/results/*.json, plots in bench/plots/.
BENCHMARKS := codecs s3_servers ingest_rate stow_rate forward_rate latency memory s3_requests pipeline_vs_orthanc
bench: install system-deps
	@for b in $(BENCHMARKS); do echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

# docs/images/dashboard/*.png: each row of the shipped Grafana dashboard drawn from the
# local stack's Prometheus after a few minutes of traffic with a destination outage
# (deploy/monitoring/dashboard_images.py; about 10 minutes). To draw the rows from any
# Prometheus: $(PY) deploy/monitoring/render_dashboard.py --prometheus URL --out DIR
dashboard-images: install system-deps
	$(PY) deploy/monitoring/dashboard_images.py

# Regenerate docs/events/*.schema.json from the event models.
schemas: install
	$(PY) -m radflow_core.schema docs/events

# Container images, one per services/*/Dockerfile, tagged $(IMAGE_PREFIX)/<service>:$(IMAGE_TAG),
# built from a clean copy of the sources (no venv or caches in the build context).
# The Dockerfiles are written from one template by deploy/images/dockerfiles.py (make
# dockerfiles); images stops if one is stale. deploy/k8s expects them; see docs/deploy.md.
# CONTAINER_TOOL=podman works too.
CONTAINER_TOOL ?= docker
IMAGE_PREFIX   ?= radflow
IMAGE_TAG      ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
PYTHON_IMAGE   ?= python:3.11-slim-bookworm
IMAGE_CONTEXT  := .run/image-context

images:
	@command -v $(CONTAINER_TOOL) >/dev/null 2>&1 || { \
	  echo "make images: '$(CONTAINER_TOOL)' not found. Install Docker, or set CONTAINER_TOOL" \
	       "to a compatible builder (e.g. make images CONTAINER_TOOL=podman)." >&2; exit 1; }
	$(PYTHON) deploy/images/dockerfiles.py --check
	rm -rf $(IMAGE_CONTEXT) && mkdir -p $(IMAGE_CONTEXT)
	tar --exclude=__pycache__ --exclude='*.egg-info' -cf - libs services deploy/images \
	  | tar -xf - -C $(IMAGE_CONTEXT)
	@set -e; for dockerfile in services/*/Dockerfile; do \
	  name=$$(basename $$(dirname $$dockerfile)); \
	  echo "building $(IMAGE_PREFIX)/$$name:$(IMAGE_TAG)"; \
	  $(CONTAINER_TOOL) build --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) \
	    -f $(IMAGE_CONTEXT)/$$dockerfile -t $(IMAGE_PREFIX)/$$name:$(IMAGE_TAG) $(IMAGE_CONTEXT); \
	done

# Without a container tool: each image's environment built as its Dockerfile says (a
# fresh venv, its pip install line, constraints.txt) under .run/image-contract/, then
# --help, --check-config and every radflow module's import run in it (deploy/images/
# contract.py; tests/deploy/test_image_contract.py does the same in make test).
image-contract: install
	$(PY) deploy/images/contract.py

# Rewrite services/*/Dockerfile from the template (after changing a service's dependencies).
dockerfiles:
	$(PYTHON) deploy/images/dockerfiles.py

# Re-pin the images' third-party versions to those installed here (after a dependency change).
constraints: install
	$(PY) deploy/images/lock.py > deploy/images/constraints.txt

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache

# The fault suite at full length (a 20-minute destination outage, a 15-minute soak,
# several hundred instances per stream; over an hour on 2 cores), then docs/reliability.md
# regenerated from its results. make test runs the same scenarios CI-sized.
faults: install system-deps
	RADFLOW_FAULTS=full $(PY) -m pytest tests/faults -m faults --timeout 7200 -p no:cacheprovider
	$(PY) tests/faults/publish.py
