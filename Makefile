# The two commands of the README: `make demo` and `make test`. Everything else here serves them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.care-setup
PIP    := $(BIN)/python -m pip
# Text generation needs no llava: the llama-cpp-python source build takes ~9 instead of ~17 min on 2 cores.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
# Nothing is ever fetched from the Hugging Face hub by the demo or the tests.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-slow lint bench clean

setup: $(STAMP)

# torch goes in first and alone, pinned: otherwise a dependency asking for plain "torch" pulls GBs of CUDA.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[all,dev]"
	$(BIN)/care export setup  # llama.cpp's converter matching the installed llama-cpp-python (pip download)
	touch $@

demo: setup
	$(BIN)/care demo

# Default suite first, then the slow end-to-end pass (CI runs both). pytest exits 5 when a selection
# collects nothing; that is not a failure here.
test: setup
	$(BIN)/python -m pytest -m "not slow" -q -p no:cacheprovider; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc
	$(BIN)/python -m pytest -m slow -q -p no:cacheprovider; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -q -x

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
