# Two commands set everything up on a fresh machine: `make demo` and `make test`
# (both depend on `make install`, which creates .venv with uv).
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")

.PHONY: install demo test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv \
		|| python3 -m pip install --quiet --break-system-packages uv
	$(UV) venv --quiet --allow-existing --python python3 $(VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(PY) -e '.[dev]'
	@touch $@

# Azurite (the Azure Blob emulator the storage tests use) from package-lock.json;
# re-run only when the lock changes.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --include=dev --loglevel=error
	@touch $@

demo: install
	$(PY) -m devtools.demo

test: install node_modules/.installed
	$(PY) -m pytest

bench: install
	$(PY) -m bench.startup
	$(PY) -m bench.pull
	$(PY) -m bench.env
	$(PY) -m bench.overhead
	$(PY) -m bench.lifecycle

lint: install
	$(VENV)/bin/ruff check runner tests bench devtools examples
	$(VENV)/bin/ruff format --check runner tests bench devtools examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache node_modules
