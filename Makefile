# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a step of theirs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export PYTHONUNBUFFERED := 1

.PHONY: venv test test-fast demo bench system-deps clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision are pinned as a pair in pyproject.toml (lpips needs torchvision).
	$(PY) -m pip install -q -e '.[test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# Debian packages the integration tests run for real: Slurm + munge, PostgreSQL, Chromium.
system-deps:
	bash scripts/install-system-deps.sh

test: venv system-deps
	$(PY) -m pytest -ra --durations=15

# Unit tests only: seconds, no services.
test-fast: venv
	$(PY) -m pytest -ra tests/unit

demo: venv
	bash scripts/demo.sh

bench: venv system-deps
	bash scripts/bench.sh

clean:
	rm -rf $(VENV) results results.db results.db-* test-artifacts bench/out
