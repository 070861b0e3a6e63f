# The two commands of the README: `make demo` and `make test`. Everything else here serves them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.care-setup
TRIAGE_MODEL := care/data/triage/model.npz
PIP    := $(BIN)/python -m pip
# llama-cpp-python is built ONCE, portably (GGML_NATIVE=OFF + one CPU module per x86 family picked at run
# time), by care/toolchain/llamacpp.py; builds are cached in the user cache by version and flags, so
# tests, `care bundle` and later checkouts on this machine reuse them.
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
export CARE_LLAMA_CPP_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/care/llama.cpp
# Nothing is ever fetched from the Hugging Face hub by the demo or the tests.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-slow lint bench clean cross-tools arm-tools tools

WHEEL  := $(VENV)/.llama-cpp-wheel

setup: $(STAMP) $(WHEEL) $(TRIAGE_MODEL)

# The triage and domain classifiers are built here, not committed: ~45 s, byte-identical on every run
# (fixed seeds), from care/data/triage/train.jsonl and the training sides of ../shared/data.
$(TRIAGE_MODEL): care/data/triage/train.jsonl scripts/train_triage.py | $(STAMP)
	$(BIN)/python scripts/train_triage.py

# torch goes in first and alone, pinned: otherwise a dependency asking for plain "torch" pulls GBs of CUDA.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt torch==2.13.0
	$(BIN)/python -m care.toolchain.llamacpp wheel --version $(LLAMA_CPP_VERSION) > $(WHEEL)
	$(PIP) install -c constraints.txt "$$(cat $(WHEEL))"
	$(PIP) install -c constraints.txt -e ".[all,dev]"
	$(BIN)/care export setup  # llama.cpp's converter matching the installed llama-cpp-python (pip download)
	touch $@

# The build module changed (flags, the binding patch: its cache key changes): build that wheel once, or find it
# cached, and swap it into the existing venv, without redoing the rest of setup.
$(WHEEL): care/toolchain/llamacpp.py care/toolchain/patches.py | $(STAMP)
	$(BIN)/python -m care.toolchain.llamacpp wheel --version $(LLAMA_CPP_VERSION) > $@.new
	$(PIP) install -q --no-deps --force-reinstall "$$(cat $@.new)"
	mv $@.new $@

demo: setup
	$(BIN)/care demo

# Debian's qemu-user and aarch64 cross compiler, for the slow portability tests (tests/test_portable_slow.py).
# apt-get only when missing and root; otherwise those tests skip and say why.
cross-tools:
	@if command -v qemu-x86_64 >/dev/null && command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu || \
	   (apt-get update -q && apt-get install -y -q qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)) >/dev/null; \
	else echo "qemu-user / gcc-aarch64-linux-gnu missing and not root: the qemu and ARM tests will skip"; fi

# llama.cpp's llama-simple (token checks) and llama-cli (the ARM bundle's chat), static, cross-built for
# aarch64 in one CMake tree (cached by version and flags; built once per machine).
arm-tools: setup cross-tools
	@if command -v aarch64-linux-gnu-g++ >/dev/null; then \
	  $(BIN)/python -m care.toolchain.llamacpp tools llama-simple llama-cli --target linux-aarch64 --version $(LLAMA_CPP_VERSION) >/dev/null; fi

# Optional: llama.cpp's own server, imatrix and quantizer for this machine (cached by version and flags; ~10 min
# on 2 cores the first time). With them, the slow tests against a real llama-server and the imatrix export run
# instead of skipping. Not part of `make test`, to keep a fresh machine's run under the hour.
tools: setup
	$(BIN)/python -m care.toolchain.llamacpp tools llama-server llama-imatrix llama-quantize --version $(LLAMA_CPP_VERSION) >/dev/null

# Default suite first, then the slow end-to-end pass (CI runs both). pytest exits 5 when a selection
# collects nothing; that is not a failure here.
test: setup arm-tools
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
