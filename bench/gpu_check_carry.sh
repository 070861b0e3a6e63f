#!/usr/bin/env bash
# Prepare what bench/gpu_check.sh needs on a lent GPU machine that has no network: .gpu_carry/ (git-ignored),
# to be named in the device run's `carry`. That machine's image has python3 3.12 with torch (CUDA),
# transformers, peft, accelerate, sentencepiece, pandas, pyarrow, rich, pyyaml, jinja2, psutil, pytest; it lacks
# trl, bitsandbytes, datasets (+ dill, multiprocess), gguf, platformdirs, diskcache and llama-cpp-python.
#
#   bench/gpu_check_carry.sh [--llama-cpp DIR]   # DIR: an installed llama_cpp package folder (default: the one
#                                                # this venv imports; prefer a portable build, see below)
# Then, on the device:  bench/gpu_check.sh --carry .gpu_carry --out "$OUT/gpu_check.json" --work /tmp/gc
#
# llama_cpp is a ctypes package (no CPython extension), so this machine's copy loads under Python 3.12 there;
# but a native build (-march=native) may use CPU features the device's CPU lacks: `care doctor` there says so
# ("native for another CPU") before the export stage would die on an illegal instruction. The travelling tree is
# limited to 64 MiB; this script fails if .gpu_carry/ alone is over 56 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LLAMA_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --llama-cpp) LLAMA_DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check_carry: unknown option $1" >&2; exit 2 ;;
  esac
done
CARRY=.gpu_carry
rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/site"
CONSTRAINTS=()
[ -f constraints.txt ] && CONSTRAINTS=(-c constraints.txt)
"$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
  --platform any ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} -d "$CARRY/wheels" \
  trl bitsandbytes datasets dill multiprocess gguf platformdirs diskcache
if [ -z "$LLAMA_DIR" ]; then
  LLAMA_DIR=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent)")
fi
cp -a "$LLAMA_DIR" "$CARRY/site/llama_cpp"
# Its dist-info too: the converter is matched to llama-cpp-python's version through importlib.metadata.
DIST=$(ls -d "$(dirname "$LLAMA_DIR")"/llama_cpp_python-*.dist-info | head -1)
cp -a "$DIST" "$CARRY/site/"
find "$CARRY/site" -name __pycache__ -prune -exec rm -rf {} +
# pip installs libX.so, libX.so.0 and libX.so.0.N.M as three copies: keep one, link the other names to it.
for real in "$CARRY"/site/llama_cpp/lib/*.so.*.*; do
  [ -f "$real" ] || continue
  base=${real%%.so.*}.so
  for name in "$base" "$base.$(basename "$real" | sed -E 's/.*\.so\.([0-9]+).*/\1/')"; do
    if [ -f "$name" ] && [ ! -L "$name" ] && [ "$name" != "$real" ] && cmp -s "$name" "$real"; then
      ln -sf "$(basename "$real")" "$name"
    fi
  done
done
CONV=$("$PY" -c "from care.export.converter import find_converter, setup_converter; print(find_converter() or setup_converter())")
cp -a "$CONV" "$CARRY/converter"
SIZE=$(du -sm "$CARRY" | cut -f1)
echo "gpu_check_carry: $CARRY is $SIZE MiB (wheels: $(ls "$CARRY/wheels" | tr '\n' ' '))" >&2
if [ "$SIZE" -gt 56 ]; then
  echo "gpu_check_carry: $CARRY is over 56 MiB; the travelling tree is limited to 64 MiB" >&2
  exit 1
fi
