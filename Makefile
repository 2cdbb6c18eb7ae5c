# The two commands: `make serve` and `make test`. Each sets up what it needs first
# (venv, packages, the default model) and skips what is already done.
PYTHON ?= python3
VENV ?= .venv
PORT ?= $(or $(KAITO_PORT),5000)
PY := $(VENV)/bin/python

.PHONY: serve test install install-test model lint bench bench-quick soak fuzz clean prometheus-rules

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off --upgrade pip

$(VENV)/.installed: pyproject.toml scripts/install.sh | $(PY)
	PYTHON=$(PY) scripts/install.sh auto
	touch $@

$(VENV)/.installed-test: pyproject.toml scripts/install.sh scripts/install-test-tools.sh | $(PY)
	PYTHON=$(PY) scripts/install.sh auto test
	scripts/install-test-tools.sh
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Prepares the default model (SmolLM2-135M-Instruct) once into ~/.cache/kaito-chat.
model: install
	$(PY) -m app.model_prep

serve: install model
	$(PY) -m app --port $(PORT)

test: install-test model
	$(PY) -m pytest

lint: install-test
	$(PY) -m ruff check app param_mapping tests bench
	$(PY) -m ruff format --check app param_mapping tests bench
	$(PY) -m mypy

# The PrometheusRule is generated from the plain rules file beside it (one source).
prometheus-rules: install
	$(PY) scripts/render_prometheusrule.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (bench/): our /chat against a Kaito-style transformers server, vLLM's own
# OpenAI server and the raw engine, on this machine, in one run. bench-quick takes under
# 5 minutes (eager engine, two systems); bench 30-45 (compiled, all four, repeated).
# Extra harness flags: make bench BENCH_ARGS="--levels 1,32 --repeat 1".
bench: install-test model
	$(PY) -m bench --profile full $(BENCH_ARGS)

bench-quick: install-test model
	$(PY) -m bench --profile quick $(BENCH_ARGS)

# Not in CI: our server at ~70% of capacity for 30 minutes (bench/soak.py).
soak: install-test model
	$(PY) -m bench.soak $(SOAK_ARGS)

# A longer schemathesis run against the real engine than CI's 500 cases.
fuzz: install-test model
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-5000} $(PY) -m pytest tests/integration/test_fuzz_live.py
