#!/bin/sh
# Start the CARE Edge chat (installed by install.sh). Extra options go to `care chat`, e.g. --once "question".
set -eu
SELF=$0
[ -L "$SELF" ] && SELF=$(dirname "$SELF")/$(readlink "$SELF")
APP=$(cd "$(dirname "$SELF")" && pwd)
[ -x "$APP/venv/bin/python" ] || { echo "Error: CARE Edge is not installed here ($APP). Run ./install.sh from the bundle folder first." >&2; exit 1; }
PREFIX=$(dirname "$APP")
# Chats, settings and the clinic's safety rules live in $PREFIX/home; a reinstall never touches them.
export CARE_HOME="$PREFIX/home" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# venvs are not relocatable by their scripts' #! lines: run the entry point with the venv's python instead.
exec "$APP/venv/bin/python" "$APP/venv/bin/care" chat --model "$APP/models/@MODEL@" @LORA@ "$@"
