#!/usr/bin/env bash
# Task throughput when the webhook backend is slow, against a local Azurite and
# a local webhook sink (tests/bench/hook_sink.py), measured side by side in one
# run (figures are only meaningful as ratios on the same machine):
#
#  A. instant: drain N echo tasks, each with a webhook_url, with
#     `worker poll --exit-when-empty` (batch 32, concurrency 32); the sink
#     answers at once.
#  B. slow: the same with the sink answering each webhook after DELAY_MS.
#
# Figure of merit: outcomes delivered per second = N / (time from the worker's
# start until the sink has answered the N-th distinct webhook-id, i.e. the
# backend has it); also the same up to the N-th *received* id, the worker's
# wall time, CPU seconds and peak RSS. N is large enough (3000) that the
# steady rate dominates the one-off DELAY_MS of the last webhook. A and B alternate over ROUNDS rounds; medians and the ratio slow /
# instant are reported (1.0: a slow backend costs nothing). After each run the
# sink must hold all N distinct webhook-ids, or the script prints FAIL and
# exits 1.
#
# Usage: bash tests/bench/webhook.sh   (env: N ROUNDS DELAY_MS;
#        WORKER_BIN=path measures another build of the worker, for before/after comparisons)
# Needs: Node.js 20+ and npm (Azurite), Python 3 (the sink), GNU time at /usr/bin/time.
set -euo pipefail

N=${N:-3000}
ROUNDS=${ROUNDS:-3}
DELAY_MS=${DELAY_MS:-500}
CONCURRENCY=32
RUN_TIMEOUT=300   # seconds one worker run may take before it is killed
SETTLE_SECS=30    # seconds the sink may wait for the last webhooks after the worker exits

cd "$(dirname "$0")/../.."
ROOT=$PWD
[ -x /usr/bin/time ] || { echo "GNU time is needed at /usr/bin/time (apt-get install time)" >&2; exit 1; }
command -v node >/dev/null || { echo "Node.js 20+ and npm are needed for Azurite" >&2; exit 1; }
command -v python3 >/dev/null || { echo "Python 3 is needed for the webhook sink" >&2; exit 1; }

echo "building (release)..." >&2
cargo build --release --locked --quiet --bin worker --example queue-load
BIN=${WORKER_BIN:-$ROOT/target/release/worker}
LOAD=$ROOT/target/release/examples/queue-load

WORK=$(mktemp -d)
AZ_PID=
SINK_PID=
# Never fails: under set -e a failing `wait` (143, the child's SIGTERM) would
# end the trap early, leaving Azurite running and the script's status 143.
cleanup() {
    local pid
    for pid in $SINK_PID $AZ_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=tests/bench/azurite.sh
. "$ROOT/tests/bench/azurite.sh"
start_azurite

# The sink: one process for every run; each run posts to its own path and its
# delay rides in the query (/<run>?delay_ms=D), so runs never mix.
: >"$WORK/sink.log"
python3 "$ROOT/tests/bench/hook_sink.py" --port-file "$WORK/sink.port" --log "$WORK/sink.log" \
    2>"$WORK/sink.err" &
SINK_PID=$!
HOOK_PORT=
for _ in $(seq 1 100); do
    [ -s "$WORK/sink.port" ] && HOOK_PORT=$(cat "$WORK/sink.port") && break
    kill -0 "$SINK_PID" 2>/dev/null || break
    sleep 0.1
done
[ -n "$HOOK_PORT" ] || { echo "the webhook sink did not start:" >&2; cat "$WORK/sink.err" >&2; exit 1; }
# The egress guard refuses loopback unless the host:port is allowed by name.
export WORKER_WEBHOOK_ALLOWED_HOSTS=127.0.0.1:$HOOK_PORT

now_ns() { date +%s%N; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
max() { sort -g | tail -1; }
# Runs "$@" under GNU time (killed after RUN_TIMEOUT); sets START (ns), WALL
# (s), CPU (user+sys s), RSS (KiB); returns the command's status.
measure() {
    local t1 rc=0
    START=$(now_ns)
    /usr/bin/time -f "%U %S %M" -o "$WORK/time" timeout -k 10 "$RUN_TIMEOUT" "$@" || rc=$?
    t1=$(now_ns)
    WALL=$(awk -v a="$START" -v b="$t1" 'BEGIN {printf "%.4f", (b-a)/1e9}')
    # The last line: GNU time puts "Command exited with non-zero status" first.
    read -r u s RSS < <(tail -1 "$WORK/time")
    CPU=$(awk -v u="$u" -v s="$s" 'BEGIN {printf "%.3f", u+s}')
    return "$rc"
}
expect_empty() {
    local left
    left=$("$LOAD" count "$1")
    [ "$left" = 0 ] || { echo "queue $1 still holds $left messages" >&2; exit 1; }
}
# Distinct webhook-ids the sink has answered for run $1.
delivered() { awk -v r="$1" '$1 == r && !($2 in s) {s[$2]; n++} END {print n+0}' "$WORK/sink.log"; }
# For run $1: the time each distinct id was first received and first answered,
# the latest of each (the N-th distinct id), all requests, peak in flight.
sink_figures() {
    awk -v r="$1" '$1 == r {
        req++; if ($5 > peak) peak = $5
        if (!($2 in rx) || $3 < rx[$2]) rx[$2] = $3
        if (!($2 in an) || $4 < an[$2]) an[$2] = $4
    } END {
        for (k in rx) if (rx[k] > last_rx) last_rx = rx[k]
        for (k in an) if (an[k] > last_an) last_an = an[k]
        printf "%.0f %.0f %d %d\n", last_rx, last_an, req, peak
    }' "$WORK/sink.log"
}

# Runs scenario $1 (label) with sink delay $2 ms as round $3; appends
# "delivered/s answered/s wall cpu rss requests peak_in_flight" to $WORK/$1.
run_worker() {
    local label=$1 delay=$2 client=hook$1$3 got waited=0 rc=0
    local url="http://127.0.0.1:$HOOK_PORT/$client?delay_ms=$delay"
    "$LOAD" fill "$client-tasks" "$N" 64 "$url" >/dev/null
    measure env WORKER_CLIENT="$client" WORKER_BATCH_SIZE=32 WORKER_CONCURRENCY=$CONCURRENCY \
        "$BIN" poll --exit-when-empty 2>"$WORK/worker.log" || rc=$?
    if [ "$rc" != 0 ]; then
        echo "FAIL: $label round $3: the worker exited with status $rc$([ "$rc" = 124 ] && echo " (killed after ${RUN_TIMEOUT}s)")" >&2
        tail "$WORK/worker.log" >&2
        exit 1
    fi
    grep -q "succeeded: $N," "$WORK/worker.log" || { echo "worker did not settle $N tasks:" >&2; tail "$WORK/worker.log" >&2; exit 1; }
    expect_empty "$client-tasks"
    # Every outcome must reach the sink; allow the last answers a moment.
    got=$(delivered "$client")
    AT_EXIT=$got
    while [ "$got" -lt "$N" ] && [ "$waited" -lt $((SETTLE_SECS * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
        got=$(delivered "$client")
    done
    if [ "$got" -lt "$N" ]; then
        echo "FAIL: $label round $3: the sink got $got of $N distinct webhook-ids (${AT_EXIT} when the worker exited, then waited ${SETTLE_SECS}s); worker log:" >&2
        grep -i "webhook" "$WORK/worker.log" | tail >&2 || true
        exit 1
    fi
    [ "$AT_EXIT" -lt "$N" ] && echo "note: $label round $3: $((N - AT_EXIT)) webhooks reached the sink after the worker exited" >&2
    read -r last_rx last_an requests peak < <(sink_figures "$client")
    echo "$(awk -v n="$N" -v a="$START" -v b="$last_rx" 'BEGIN {printf "%.1f", n/((b-a)/1e9)}')" \
        "$(awk -v n="$N" -v a="$START" -v b="$last_an" 'BEGIN {printf "%.1f", n/((b-a)/1e9)}')" \
        "$WALL $CPU $RSS $requests $peak" >>"$WORK/$label"
}

# Warm-up (Azurite's JIT, the page cache, the sink), not counted.
echo "warm-up..." >&2
: >"$WORK/warmup"
run_worker warmup 0 0
echo "webhooks: $ROUNDS rounds of $N tasks, instant sink and ${DELAY_MS} ms sink..." >&2
: >"$WORK/instant"; : >"$WORK/slow"
for r in $(seq 1 "$ROUNDS"); do
    # Alternate the order so that neither side always runs on a fresher Azurite.
    if [ $((r % 2)) = 1 ]; then run_worker instant 0 "$r"; run_worker slow "$DELAY_MS" "$r"
    else run_worker slow "$DELAY_MS" "$r"; run_worker instant 0 "$r"; fi
done

# ---- report ------------------------------------------------------------------
col() { cut -d' ' -f"$2" "$WORK/$1"; }
I_RATE=$(col instant 2 | median); S_RATE=$(col slow 2 | median)
RATIO=$(awk -v s="$S_RATE" -v i="$I_RATE" 'BEGIN {printf "%.2f", s/i}')
verdict() { if awk -v a="$1" -v b="$2" "BEGIN {exit !(a $3 b)}"; then echo "met"; else echo "MISSED"; fi; }
MIB() { awk -v k="$1" 'BEGIN {printf "%.1f", k/1024}'; }
row() {
    printf "%-22s %11.0f %11.0f %8.2f %7.3f %6s MiB %8s %9s\n" "$2" \
        "$(col "$1" 1 | median)" "$(col "$1" 2 | median)" "$(col "$1" 3 | median)" \
        "$(col "$1" 4 | median)" "$(MIB "$(col "$1" 5 | max)")" "$(col "$1" 6 | max)" "$(col "$1" 7 | max)"
}
echo
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); Azurite $(node -p "require('$ROOT/tests/node_modules/azurite/package.json').version"); worker $BIN"
echo
echo "draining $N echo tasks with a webhook each, batch 32, concurrency $CONCURRENCY (median of $ROUNDS rounds; RSS, requests, in flight: max)"
printf "%-22s %11s %11s %8s %7s %10s %8s %9s\n" "sink" "received/s" "delivered/s" "wall s" "CPU s" "peak RSS" "requests" "in flight"
row instant "instant (0 ms)"
row slow "slow (${DELAY_MS} ms)"
printf "%-22s %11s\n" "slow / instant" "$RATIO"
echo "   received/s: N / (worker start -> N-th distinct webhook-id received); delivered/s: -> its answer (2xx)"
echo "   a worker whose task slots wait for their webhooks is bound by $CONCURRENCY / ${DELAY_MS} ms = $(awk -v c="$CONCURRENCY" -v d="$DELAY_MS" 'BEGIN {if (d > 0) printf "%.0f", c*1000/d; else print "-"}')/s when slow"
echo "   per round (received/s, delivered/s, wall s, CPU s, RSS KiB, requests, in flight):"
echo "   instant: $(tr '\n' ';' <"$WORK/instant")"
echo "   slow:    $(tr '\n' ';' <"$WORK/slow")"
echo
echo "delivered/s instant=$(printf '%.0f' "$I_RATE") slow${DELAY_MS}=$(printf '%.0f' "$S_RATE") ratio=$RATIO"
echo
echo "targets:"
echo "   slow / instant >= 0.8:  $RATIO  $(verdict "$RATIO" 0.8 '>=')"
