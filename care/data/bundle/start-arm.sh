#!/bin/sh
# Start llama.cpp's chat with the bundled model (Termux on a phone, or an ARM Linux board).
# Extra options go to llama-cli, e.g. -t 4 (threads) or -c 4096 (context).
set -eu
SELF=$0
[ -L "$SELF" ] && SELF=$(dirname "$SELF")/$(readlink "$SELF")
APP=$(cd "$(dirname "$SELF")" && pwd)
exec "$APP/bin/llama-cli" -m "$APP/models/@MODEL@" -cnv --temp 0.7 "$@"
