#!/bin/sh
# CARE Edge offline installer. Usage: ./install.sh [FOLDER]   (default: $HOME/care-edge)
# Checks everything first (files, checksums, OS, CPU architecture and features, Python, free space), then
# installs into a temp folder and renames it into place, so a failed or interrupted install leaves nothing
# half-done.
# Your chats and settings live in FOLDER/home and are never touched by a (re)install.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=${1:-${CARE_PREFIX:-$HOME/care-edge}}
fail() { echo "Error: $*" >&2; exit 1; }
cd "$HERE"

# 1. Every file is there and intact, before anything is written.
[ -f SHA256SUMS ] || fail "SHA256SUMS is missing from the bundle folder ($HERE). Copy the whole bundle again or unpack the .tar.gz again."
command -v sha256sum >/dev/null 2>&1 || fail "sha256sum not found. It is part of coreutils on every Linux; install coreutils."
while read -r _sum path; do
  [ -f "$path" ] || fail "File missing from the bundle: $path. Copy the whole bundle again or unpack the .tar.gz again."
done < SHA256SUMS
bad=$(sha256sum -c SHA256SUMS 2>/dev/null | grep -v ': OK$' | head -n 1 | sed 's/: .*//' || true)
[ -z "$bad" ] || fail "File corrupted (checksum mismatch): $bad. Copy the bundle again from the original; do not use this copy."
. ./bundle.env

# 2. The machine is the one this bundle was built for.
[ "$(uname -s)" = Linux ] || fail "This bundle is for Linux; this machine runs $(uname -s)."
arch=$(uname -m)
case "$BUNDLE_PLATFORM" in
  linux-x86_64) [ "$arch" = x86_64 ] || fail "This bundle is for x86-64 PCs; this machine is $arch. Build one with: care bundle --platform linux-aarch64" ;;
  linux-aarch64) [ "$arch" = aarch64 ] || fail "This bundle is for 64-bit ARM (aarch64); this machine is $arch." ;;
esac
# The CPU has the instructions the programs use, else they die with "Illegal instruction" at start.
# x86-64: numpy (needed by the llama.cpp binding) is built for x86-64-v2 (SSE4.2, POPCNT); llama.cpp itself
# picks its kernels at run time. ARM: llama.cpp is built for ARMv8.2-A with dot-product and FP16.
# (CARE_CPUINFO: another cpuinfo file, for the installer's own tests.)
# CARE_PREBUILT_VENV: a venv that termux-build.sh built on this very machine (its llama.cpp compiled for this
# CPU, its Python the one found here), moved in instead of the bundle's wheels: those checks do not apply.
PREBUILT=${CARE_PREBUILT_VENV:-}
CPUINFO=${CARE_CPUINFO:-/proc/cpuinfo}
if [ -z "$PREBUILT" ] && [ -r "$CPUINFO" ]; then
  case "$BUNDLE_PLATFORM" in
    linux-x86_64) need="ssse3 sse4_1 sse4_2 popcnt"
      cpu="an x86-64 CPU with SSE4.2 and POPCNT (most PCs made since 2010)" ;;
    linux-aarch64) need="asimddp fphp asimdhp"
      cpu="an ARMv8.2-A CPU with dot-product and FP16 (Cortex-A55/A75/A76 or newer; not a Raspberry Pi 3 or 4)" ;;
    *) need="" ;;
  esac
  have=" $(grep -m 1 -E '^(flags|Features)[[:space:]]*:' "$CPUINFO" | sed 's/^[^:]*://' | tr '\t' ' ') "
  lacks=""
  for f in $need; do case "$have" in *" $f "*) ;; *) lacks="$lacks $f" ;; esac; done
  [ -z "$lacks" ] || fail "This CPU is too old for CARE Edge (it lacks:$lacks). It needs $cpu."
fi
[ -n "$BUNDLE_PYTHON" ] || fail "bundle.env names no Python version. This bundle is damaged or from an old CARE Edge; build it again."
if [ -n "$PREBUILT" ]; then
  [ -x "$PREBUILT/bin/python" ] || fail "CARE_PREBUILT_VENV=$PREBUILT is not a Python environment (no bin/python). Run termux-build.sh again."
else
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    for cand in "python$BUNDLE_PYTHON" python3; do
      if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
    done
  fi
  [ -n "$PY" ] || fail "Python $BUNDLE_PYTHON not found. This bundle needs Python $BUNDLE_PYTHON (set PYTHON=/path/to/python$BUNDLE_PYTHON)."
  found=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || fail "Could not run $PY."
  [ "$found" = "$BUNDLE_PYTHON" ] || fail "This bundle needs Python $BUNDLE_PYTHON, found Python $found ($PY). Install Python $BUNDLE_PYTHON or build the bundle on a machine with Python $found."
  "$PY" -c 'import venv' 2>/dev/null || fail "Python's venv module is missing (Debian/Ubuntu: the python$BUNDLE_PYTHON-venv package)."
fi

# 3. Enough free space where it goes.
mkdir -p "$PREFIX" 2>/dev/null || fail "Cannot create the install folder $PREFIX (permissions?). Pass another folder: ./install.sh FOLDER"
PREFIX=$(cd "$PREFIX" && pwd)
free_kb=$(df -Pk "$PREFIX" | awk 'NR==2 {print $4}')
[ "$free_kb" -ge "$BUNDLE_INSTALL_KB" ] || fail "Not enough disk space in $PREFIX: need $((BUNDLE_INSTALL_KB / 1024)) MiB, $((free_kb / 1024)) MiB free. Free some space or pass another folder: ./install.sh FOLDER"

# 4. Install into a temp folder; rename at the end.
TMP=$(mktemp -d "$PREFIX/.app-new.XXXXXX")
chmod 755 "$TMP"
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM
echo "Installing CARE Edge into $PREFIX ..."
if [ -n "$PREBUILT" ]; then
  # A venv runs from wherever it is when started through its own bin/python (start.sh does): it can move.
  mv "$PREBUILT" "$TMP/venv" || fail "Could not move $PREBUILT into $TMP."
  "$TMP/venv/bin/python" -c 'import llama_cpp, care' 2>"$TMP/check.log" \
    || fail "The runtime built on this phone does not load ($(tail -n 1 "$TMP/check.log")). Nothing was installed."
  rm -f "$TMP/check.log"
else
  "$PY" -m venv --without-pip "$TMP/venv" || fail "Could not create a Python environment in $TMP."
  pipwhl=$(ls wheels/pip-*.whl | head -n 1)
  # pip runs from its own wheel: no ensurepip (Debian's python3 lacks it), no network (--no-index).
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONFIG_FILE=/dev/null "$TMP/venv/bin/python" "$pipwhl/pip" install -q \
    --no-index --no-cache-dir --find-links "$HERE/wheels" wheels/*.whl > "$TMP/pip.log" 2>&1 \
    || fail "Installing the Python packages failed (last line: $(tail -n 1 "$TMP/pip.log")). Nothing was installed."
  "$TMP/venv/bin/python" -c 'import llama_cpp, care' 2>"$TMP/check.log" \
    || fail "The installed runtime does not load ($(tail -n 1 "$TMP/check.log")). Nothing was installed."
  rm -f "$TMP/pip.log" "$TMP/check.log"
fi
cp -r models "$TMP/models"
[ ! -d config ] || cp -r config "$TMP/config"
cp bundle.json start.sh README-CLINIC.md "$TMP/"

old=""
if [ -e "$PREFIX/app" ]; then old=$(mktemp -d "$PREFIX/.app-old.XXXXXX"); mv "$PREFIX/app" "$old/app"; fi
mv "$TMP" "$PREFIX/app" || { [ -z "$old" ] || mv "$old/app" "$PREFIX/app"; fail "Could not move the new install into $PREFIX/app."; }
trap - EXIT
[ -z "$old" ] || rm -rf "$old"
mkdir -p "$PREFIX/home"
if [ -f "$PREFIX/app/config/safety.yaml" ]; then
  mkdir -p "$PREFIX/home/config"
  dest="$PREFIX/home/config/safety.yaml"
  if [ -f "$dest" ] && ! cmp -s "$dest" "$PREFIX/app/config/safety.yaml"; then cp "$dest" "$dest.bak-$(date +%Y%m%d%H%M%S)"; fi
  cp "$PREFIX/app/config/safety.yaml" "$dest"
fi
ln -sf app/start.sh "$PREFIX/start.sh"
if :; then
  # Once, here: which llama.cpp CPU module runs on this CPU (a child process proves it; a module that dies is
  # left out). Cached in home/, so every chat starts straight away.
  CARE_HOME="$PREFIX/home" "$PREFIX/app/venv/bin/python" -m care.runtime.cpu_guard \
    || fail "llama.cpp cannot run on this CPU (see the line above). The files are installed in $PREFIX/app; send this message to whoever made the bundle."
fi
echo "Done. Start the assistant with: $PREFIX/start.sh"
