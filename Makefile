# The two commands of the README: `make demo` and `make test`. Everything else here serves them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.care-setup
TRIAGE_MODEL := care/data/triage/model.npz
PIP    := $(BIN)/python -m pip
# llama-cpp-python is built ONCE, portably (GGML_NATIVE=OFF + one CPU module per x86 family picked at run
# time), by care/toolchain/llamacpp/; builds are cached in the user cache by version and flags, so
# tests, `care bundle` and later checkouts on this machine reuse them.
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
export CARE_LLAMA_CPP_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/care/llama.cpp
# Nothing is ever fetched from the Hugging Face hub by the demo or the tests.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-slow lint bench clean cross-tools arm-wheel arm-root tools web-tools

WHEEL  := $(VENV)/.llama-cpp-wheel

setup: $(STAMP) $(WHEEL) $(TRIAGE_MODEL)

# The triage, language and domain classifiers are built here, not committed: about 5 min on 2 cores, the same
# on every run (fixed seeds), from care/data/triage/train*.jsonl, the language files and the training sides of ../shared/data.
TRIAGE_INPUTS := $(wildcard care/data/triage/train*.jsonl care/data/safety/*.yaml care/data/safety/lang/*.yaml \
                   care/runtime/triage/*.py) scripts/train_triage.py
$(TRIAGE_MODEL): $(TRIAGE_INPUTS) | $(STAMP)
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
$(WHEEL): $(wildcard care/toolchain/llamacpp/*.py) | $(STAMP)
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

# Debian's headless chromium and its driver, for the web chat's browser tests (tests/test_web_chat.py).
# apt-get only when missing and root; otherwise those tests skip and name this target.
web-tools:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)) >/dev/null; \
	else echo "chromium / chromium-driver missing and not root: the web chat browser tests will skip"; fi

# An arm64 Debian 12 userland (Python 3.11, tmux) where the slow test installs the ARM bundle with no network and
# runs it, every program of it under qemu-aarch64: debootstrap --foreign downloads and unpacks the packages
# (dpkg -x the ones it only downloads; nothing ARM runs here), and binfmt_misc hands aarch64 programs to qemu
# (Debian's own qemu-user-binfmt entry; QEMU_LD_PREFIX points qemu at this root). ~240 MB, in the user cache.
# As root; otherwise that test skips and names this target.
ARM_ROOT ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/care/arm64-root-bookworm
export CARE_ARM_ROOT ?= $(ARM_ROOT)
arm-root: cross-tools
	@if [ -x "$(ARM_ROOT)/usr/bin/python3.11" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  command -v debootstrap >/dev/null || (apt-get install -y -q debootstrap || (apt-get update -q && apt-get install -y -q debootstrap)) >/dev/null; \
	  rm -rf "$(ARM_ROOT).part" && mkdir -p "$$(dirname $(ARM_ROOT))" && \
	  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,tmux,locales,mawk \
	    bookworm "$(ARM_ROOT).part" http://deb.debian.org/debian >/dev/null && \
	  for d in "$(ARM_ROOT).part"/var/cache/apt/archives/*.deb; do dpkg -x "$$d" "$(ARM_ROOT).part"; done && \
	  ln -sf mawk "$(ARM_ROOT).part/usr/bin/awk" && \
	  mv "$(ARM_ROOT).part" "$(ARM_ROOT)"; \
	else echo "no arm64 root and not root: the ARM bundle test will skip"; fi
	@if [ "$$(id -u)" = 0 ] && [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]; then \
	  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true; \
	  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register 2>/dev/null || true; \
	fi

# The CARE runtime's llama-cpp-python for aarch64 (cross-built, ~12 min on 2 cores; cached by version and flags).
arm-wheel: setup cross-tools
	@if command -v aarch64-linux-gnu-g++ >/dev/null; then \
	  $(BIN)/python -m care.toolchain.llamacpp wheel --target linux-aarch64 --version $(LLAMA_CPP_VERSION) >/dev/null; fi

# Optional: llama.cpp's own server, imatrix and quantizer for this machine (cached by version and flags; ~10 min
# on 2 cores the first time). With them, the slow tests against a real llama-server and the imatrix export run
# instead of skipping. Not part of `make test`, to keep a fresh machine's run under the hour.
tools: setup
	$(BIN)/python -m care.toolchain.llamacpp tools llama-server llama-imatrix llama-quantize --version $(LLAMA_CPP_VERSION) >/dev/null

# Default suite first, then the slow end-to-end pass (CI runs both). pytest exits 5 when a selection
# collects nothing; that is not a failure here.
test: setup arm-wheel arm-root web-tools
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
