#!/usr/bin/env bash
# One script for a lent GPU (designed for < 8 minutes on one datacenter GPU; figures in one JSON):
#   doctor -> Phi-3.5-mini-shaped model -> CARE recipe 30 steps (QLoRA NF4, r=8, batch 4 x 1024, chosen
#   precision; peak GPU memory, tokens/s) -> bench/train_throughput.py ours vs plain transformers+peft ->
#   merge -> export q4_k_m with verification.
# Exits non-zero on the first failure, naming the stage; the JSON then holds every figure measured so far.
#
#   bench/gpu_check.sh [--out gpu_check.json] [--work DIR] [--layers 32] [--gradient-checkpointing] [--smoke]
#                      [--carry .gpu_carry]   # on a machine without network: what bench/gpu_check_carry.sh made
#
# --smoke: every stage on the 2-layer test Phi-3, a few steps at 128 tokens, on a CPU (the script's own check,
#          no figures worth quoting). Targets when run on a GPU: peak GPU memory <= 14 GB (the paper's 16 GB
#          P100 fits), ours >= 1.3x the plain baseline's tokens/s.
# Env: PYTHON (default .venv/bin/python, else python3), CARE_THREADS (export/verify threads).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=gpu_check.json WORK="" LAYERS=32 SMOKE=0 GC=() CARRY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --layers) LAYERS=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --carry) CARRY=$2; shift 2 ;;
    --gradient-checkpointing) GC=(--gradient-checkpointing); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/care-gpu-check.XXXXXX")}
mkdir -p "$WORK"
case "$OUT" in /*) ;; *) OUT="$REPO/$OUT" ;; esac
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 CARE_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
: > "$WORK/times.tsv"
STAGE=setup
T0=$SECONDS

on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "gpu_check: FAILED at stage '$STAGE' (exit $rc); logs and partial figures in $WORK" >&2
    "$PY" bench/gpu_check.py collect --work "$WORK" --out "$OUT" --failed "$STAGE" >/dev/null 2>&1 || true
  fi
}
trap on_exit EXIT

if [ -n "$CARRY" ]; then  # carried wheels and llama_cpp (bench/gpu_check_carry.sh); the machine is bare and lent
  case "$CARRY" in /*) ;; *) CARRY="$REPO/$CARRY" ;; esac
  STAGE=carry
  "$PY" -m pip install -q --no-index --no-deps "$CARRY"/wheels/*.whl
  export PYTHONPATH="$CARRY/site:$PYTHONPATH" CARE_CONVERTER_DIR="$CARRY/converter"
fi

run_stage() {  # run_stage NAME CMD... : time it, log its stderr to WORK/NAME.log
  STAGE=$1; shift
  local t=$SECONDS
  echo "== $STAGE" >&2
  "$@" 2> >(tee "$WORK/$STAGE.log" >&2)
  printf '%s\t%s\n' "$STAGE" "$((SECONDS - t))" >> "$WORK/times.tsv"
}

if [ "$SMOKE" = 1 ]; then
  # The smoke model's 500-piece tokenizer is trained on README.md (tests/test_export_gguf.py), so its lengths move
  # with the README: Bitext rows measured 514-631 tokens on 2026-12-04, and a row over --max-length is dropped.
  SIZE=(--steps 3 --batch 2 --max-length 128); CMP=(--steps 3 --batch 2 --max-length 2048); MODEL=(--smoke)
else
  SIZE=(--steps 30 --batch 4 --max-length 1024); CMP=(--steps 10 --batch 4 --max-length 1024); MODEL=(--layers "$LAYERS")
fi

run_stage doctor sh -c "'$PY' -m care.cli doctor --json > '$WORK/doctor.json'"
run_stage model "$PY" bench/gpu_check.py model --work "$WORK" "${MODEL[@]}"
run_stage train "$PY" bench/gpu_check.py train --work "$WORK" "${SIZE[@]}" ${GC[@]+"${GC[@]}"}
run_stage compare "$PY" bench/gpu_check.py compare --work "$WORK" "${CMP[@]}"
run_stage merge sh -c "'$PY' -m care.cli merge '$WORK/run/adapter' --out '$WORK/merged' > '$WORK/merge.json'"
run_stage export sh -c "'$PY' -m care.cli export gguf '$WORK/merged' --out '$WORK/gguf' --q4_k_m --json > '$WORK/export.json'"
STAGE=collect
"$PY" bench/gpu_check.py collect --work "$WORK" --out "$OUT"
echo "gpu_check: all stages passed in $((SECONDS - T0)) s; figures in $OUT (work folder $WORK)" >&2
