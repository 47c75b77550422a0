# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a step of theirs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export PYTHONUNBUFFERED := 1

.PHONY: venv test test-fast lint demo bench system-deps lock wheel clean

# The tested set: pyproject.toml says what hparray accepts (ranges), constraints.txt what was
# tested together (torch and torchvision as a pair), so demo and test runs are reproducible.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,trackers,test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# Debian packages the integration tests run for real: Slurm + munge, PostgreSQL, Chromium.
system-deps:
	bash scripts/install-system-deps.sh

test: venv system-deps lint
	$(PY) -m pytest -ra --durations=15

# The linter and the type checker (configured in pyproject.toml); part of `make test`.
lint: venv
	$(PY) -m ruff check hparray tests bench scripts
	$(PY) -m mypy

# Unit tests only: seconds, no services.
test-fast: venv
	$(PY) -m pytest -ra tests/unit

demo: venv
	bash scripts/demo.sh

bench: venv system-deps
	bash scripts/bench.sh

# The wheel to install elsewhere (sql/, sbatch/ and configs/ inside it): dist/hparray-*.whl
wheel: venv
	$(PY) -m pip wheel --no-deps --no-build-isolation -q -w dist .

# After an intended upgrade in the venv: write the tested set back to constraints.txt.
lock: venv
	$(PY) -m pip freeze --exclude-editable | grep -vi '^hparray' > constraints.txt

clean:
	rm -rf $(VENV) results results.db results.db-* test-artifacts bench/out dist
