#!/usr/bin/env bash
# Drive the real `care chat` in an 80x24 tmux terminal (as over SSH) with the embedded GGUF and check
# the screen text: start time before the model loads, a streamed reply, the status bar, Ctrl+Q and resume,
# kill -9 mid-reply and resume with the partial reply on disk, Esc stop, the history screen. Prints measured figures; exit 1 on failure.
#
#   bench/tui_tmux_check.sh            (from the repo root; needs tmux: apt-get install -y tmux)
set -euo pipefail

cd "$(dirname "$0")/.."
CARE="${CARE:-$PWD/.venv/bin/care}"
PY="${PY:-$PWD/.venv/bin/python}"
WORK="$(mktemp -d)"
SESSION="care-tui-check-$$"
export CARE_HOME="$WORK/home" CARE_THREADS="${CARE_THREADS:-1}" HF_HUB_OFFLINE=1 TERM=xterm-256color
CMD="$CARE chat --max-tokens 24 --temperature 0 --seed 0 --n-ctx 1024"
FAILED=0

cleanup() { tmux kill-session -t "$SESSION" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

screen() { tmux capture-pane -p -t "$SESSION"; }
now() { date +%s.%N; }
# wait_for TEXT TIMEOUT_S -> prints seconds waited, fails the check if not seen
wait_for() {
    local text="$1" limit="$2" t0
    t0=$(now)
    while ! screen | grep -qF -- "$text"; do
        if (($(echo "$(now) - $t0 > $limit" | bc))); then
            echo "FAIL: '$text' not on screen after ${limit}s. Screen:" >&2
            screen >&2
            FAILED=1
            return 1
        fi
        sleep 0.05
    done
    echo "$(now) - $t0" | bc
}
check() {  # check TEXT WHAT
    if screen | grep -qF -- "$1"; then echo "ok   $2"; else echo "FAIL $2: '$1' not on screen" >&2; screen >&2; FAILED=1; fi
}
app_pid() { tmux list-panes -t "$SESSION" -F '#{pane_pid}'; }
# The pane stays after the app exits (remain-on-exit), so a crash leaves its traceback on screen.
start_app() {
    tmux kill-session -t "$SESSION" 2>/dev/null || true
    tmux new-session -d -s "$SESSION" -x 80 -y 24
    tmux set-option -t "$SESSION" remain-on-exit on >/dev/null
    tmux respawn-pane -k -t "$SESSION" "$1"
}
app_exited() { [ "$(tmux display-message -p -t "$SESSION" '#{pane_dead}')" = 1 ]; }
wait_exit() {  # wait_exit WHAT
    for _ in $(seq 50); do app_exited && break; sleep 0.1; done
    if app_exited; then echo "ok   $1"; else echo "FAIL $1: the app is still running" >&2; FAILED=1; fi
}

# 1. Start: the window (status bar) must show before the model has loaded.
t0=$(now)
start_app "$CMD"
ui_s=$(wait_for "offline" 20)
ui_s=$(echo "$(now) - $t0" | bc)
model_s=$(wait_for "Q4_1" 60)
model_s=$(echo "$(now) - $t0" | bc)
printf 'start: window shown after %.2f s; model ready after %.2f s\n' "$ui_s" "$model_s"
if (($(echo "$ui_s < 2.0" | bc))); then echo "ok   window under 2 s"; else echo "WARN window took ${ui_s}s (target < 2 s; machine shared?)"; fi
check "│ auto │" "status bar shows the domain (auto until the first message)"
check "/1024" "status bar shows context used / n_ctx"

# 2. A message: the reply streams in and the status bar shows its speed.
tmux send-keys -t "$SESSION" -l "What is the capital of France?"
tmux send-keys -t "$SESSION" Enter
wait_for "CARE" 30 >/dev/null
wait_for " tok/s │ offline" 90 >/dev/null || true
screen | grep -q "[0-9] tok/s" && echo "ok   tokens/s of the last reply shown" || { echo "FAIL no tok/s" >&2; FAILED=1; }
check "What is the capital of France?" "user message shown"
echo "--- screen after the reply ---"; screen; echo "------------------------------"

# 3. Ctrl+Q quits; a new start resumes the chat.
tmux send-keys -t "$SESSION" C-q
wait_exit "Ctrl+Q quits"
LONG="$CARE chat --max-tokens 400 --temperature 0 --seed 0 --n-ctx 2048"
start_app "$LONG"
wait_for "Q4_1" 60 >/dev/null
check "What is the capital of France?" "after Ctrl+Q and a new start the chat is resumed"

# 4. kill -9 in the middle of a long reply (a crash): the part already shown is on disk.
sleep 0.5
tmux send-keys -t "$SESSION" -l "Write a long story about a clinic in the mountains."
tmux send-keys -t "$SESSION" Enter
wait_for "writing" 20 >/dev/null
sleep 2
pid=$(app_pid); kill -9 $(pgrep -P "$pid") "$pid" 2>/dev/null || true
sleep 0.5
"$PY" - "$CARE_HOME/data/chats.sqlite3" <<'EOF' || FAILED=1
import sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute("SELECT role, complete, length(content) FROM messages").fetchall()
print("db rows after kill -9 (role, complete, chars):", rows)
assert [r[0] for r in rows] == ["user", "assistant", "user", "assistant"], "messages missing"
assert rows[1][1] == 1 and rows[3][1] == 0 and rows[3][2] > 0, "partial reply not on disk"
print("ok   SQLite holds the partial reply written before kill -9")
EOF
start_app "$LONG"
wait_for "Q4_1" 60 >/dev/null
sleep 0.3
check "interrupted" "resumed after kill -9, the cut reply is marked interrupted"

# 5. Esc stops a reply mid-stream on the real model.
tmux send-keys -t "$SESSION" -l "Tell me about malaria prevention in detail."
tmux send-keys -t "$SESSION" Enter
wait_for "writing" 20 >/dev/null
sleep 1
tmux send-keys -t "$SESSION" Escape
wait_for "Reply stopped." 10 >/dev/null && echo "ok   Esc stops the reply"
echo "--- screen after Esc ---"; screen; echo "------------------------"

# 6. History screen, then quit.
sleep 0.3
tmux send-keys -t "$SESSION" F2
wait_for "Enter open" 10 >/dev/null && check "capital of France" "history lists the chat"
echo "--- history screen ---"; screen; echo "----------------------"
tmux send-keys -t "$SESSION" Escape
sleep 0.3
tmux send-keys -t "$SESSION" C-q
wait_exit "Ctrl+Q quits from the chat screen"

[ "$FAILED" = 0 ] && echo "ALL OK" || { echo "SOME CHECKS FAILED" >&2; exit 1; }
