#!/bin/sh
# Start llama.cpp's chat with the bundled model (Termux on a phone, or an ARM Linux board). It uses the
# model's own chat template. Extra options go to llama-cli and win over these, e.g. -t 4 (threads),
# -c 8192 (context), or -p "question" -st (answer one question and exit).
set -eu
SELF=$0
[ -L "$SELF" ] && SELF=$(dirname "$SELF")/$(readlink "$SELF")
APP=$(cd "$(dirname "$SELF")" && pwd)
# -c 4096: llama.cpp's default is the model's training context, which for some models needs more memory
# than a phone has.
exec "$APP/bin/llama-cli" -m "$APP/models/@MODEL@" -c 4096 --temp 0.7 "$@"
