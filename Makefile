# Fresh machine: `make run` (full pipeline on the bundled sample) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PREFECT := $(VENV)/bin/prefect
# The interpreter the venv is made from: CPython 3.11, as requirements.lock is resolved for
# (the Dockerfile passes a uv-managed 3.11; Ubuntu 24.04's python3 is 3.12).
PYTHON ?= python3
WORK_POOL ?= medxfer
SAMPLE_DIR := outputs/sample/breastmnist-dicom
CONFIG ?= configs/breast_ultrasound.yaml
# Air-gapped sites: the embedded Prefect server sends no usage telemetry.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# A busy 2-core machine can take longer than Prefect's default to start the ephemeral server.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install lock run sample test serve score pacs-demo deploy worker clean stack stack-status stack-down automations

# --no-cache-dir: where pip downloads over HTTP, its cache would keep a second copy of the
# ~3 GB of CUDA torch wheels beside the 7 GB venv, on CI disks that have little to spare.
# requirements.lock pins every package, direct and transitive; --no-deps keeps pip from
# resolving anything of its own, so every install is the set the tests ran on.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir pip==26.3  # the installer itself, pinned too
	$(PY) -m pip install --quiet --no-cache-dir --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-cache-dir --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# Refresh the lock after changing pyproject.toml or constraints.txt (needs the registry):
# the direct dependencies and constraints.txt's pins are resolved again, for the Python and
# platform the project runs on (CPython 3.11, manylinux x86-64). Then `make install`, `make test`.
lock:
	$(PY) -m uv pip compile pyproject.toml --extra dev --extra dask -c constraints.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package medxfer \
		--custom-compile-command "make lock" -o requirements.lock

$(SAMPLE_DIR)/manifest.csv: $(VENV)/.installed sample_data/breastmnist.npz
	$(PY) -m sample_data.breastmnist $(SAMPLE_DIR)

sample: $(SAMPLE_DIR)/manifest.csv

run: sample
	$(PY) -m flows.pipeline $(CONFIG)

test: install
	$(PY) -m pytest

# The registry's champion behind http://$(serve.host):$(serve.port) (see README, "Inference service").
serve: install
	$(PY) -m serve $(CONFIG)

# Score a folder of new studies with the champion: make score STUDIES=/path/to/folder
score: install
	$(PY) -m flows.score $(CONFIG) $(STUDIES)

# A hospital PACS in miniature (README, "Connecting to a hospital's PACS"): starts Orthanc, loads the
# bundled sample with accession numbers and a label export, trains from the PACS, scores new studies and
# leaves their SRs in Orthanc (outputs/pacs-demo/orthanc). Needs Debian's orthanc and orthanc-dicomweb.
pacs-demo: install
	$(PY) -m sample_data.pacs_demo outputs/pacs-demo

# Every deployment in prefect.yaml on the server at $$PREFECT_API_URL, run from this checkout:
# the process work pool first (once per server), then `prefect deploy --all`, which also
# creates the `gpu` concurrency limit. Then start a worker (`make worker`). See README.
deploy:
	$(PREFECT) work-pool inspect $(WORK_POOL) > /dev/null 2>&1 \
		|| $(PREFECT) work-pool create $(WORK_POOL) --type process
	$(PREFECT) --no-prompt deploy --all

worker:
	$(PREFECT) worker start --pool $(WORK_POOL)

# The production stack on one host (README, "Production stack on one host"): PostgreSQL, the
# object store, the MLflow and Prefect servers, a worker and the service, as processes with pid
# files and logs under .stack/ (MEDXFER_STACK_HOME). Ports and secrets: see stack/settings.py.
stack: install
	$(PY) -m stack up

stack-status: install
	$(PY) -m stack status

stack-down: install
	$(PY) -m stack down

# Prefect automations (failure alerts, promotion): needs MEDXFER_ALERT_WEBHOOK_URL and the stack's
# client environment (eval "$$($(PY) -m stack env)").
automations: install
	$(PY) -m stack.automations

clean:
	rm -rf outputs .cache
