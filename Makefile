# Fresh machine: `make run` (full pipeline on the bundled sample) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
SAMPLE_DIR := outputs/sample/breastmnist-dicom
CONFIG ?= configs/breast_ultrasound.yaml
# Air-gapped sites: the embedded Prefect server sends no usage telemetry.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# A busy 2-core machine can take longer than Prefect's default to start the ephemeral server.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install run sample test serve score clean

# --no-cache-dir: where pip downloads over HTTP, its cache would keep a second copy of the
# ~3 GB of CUDA torch wheels beside the 7 GB venv, on CI disks that have little to spare.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

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

clean:
	rm -rf outputs .cache
