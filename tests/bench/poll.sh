#!/usr/bin/env bash
# Polling mode and job mode against a local Azurite, measured side by side in
# one run (figures are only meaningful as ratios on the same machine):
#
#  1. Throughput: drain N echo tasks with `worker poll --exit-when-empty`
#     (batch 32, concurrency 32) next to the ceiling, a bare receive-32 +
#     concurrent-delete loop with the same queue client (queue-load drain).
#     Also the worker's CPU seconds per 1000 tasks and its peak RSS.
#  2. Idle cost: receive calls on an empty queue over IDLE_SECS, against the
#     bound of one per WORKER_MAX_POLL_INTERVAL once backed off.
#  3. Job mode: exec -> lease -> settle -> exit wall time and peak RSS per
#     task (median of JOB_RUNS), next to single-task mode (TASK_DATA echo).
#
# Usage: bash tests/bench/poll.sh   (env: N ROUNDS IDLE_SECS IDLE_INTERVAL JOB_RUNS;
#        WORKER_BIN=path measures another build of the worker, for before/after comparisons)
# Needs: Node.js 20+ and npm (Azurite), GNU time at /usr/bin/time.
set -euo pipefail

N=${N:-500}
ROUNDS=${ROUNDS:-3}
IDLE_SECS=${IDLE_SECS:-60}
IDLE_INTERVAL=${IDLE_INTERVAL:-5}
JOB_RUNS=${JOB_RUNS:-21}
CONCURRENCY=32

cd "$(dirname "$0")/../.."
ROOT=$PWD
[ -x /usr/bin/time ] || { echo "GNU time is needed at /usr/bin/time (apt-get install time)" >&2; exit 1; }
command -v node >/dev/null || { echo "Node.js 20+ and npm are needed for Azurite" >&2; exit 1; }

echo "building (release)..." >&2
cargo build --release --locked --quiet --bin worker --example queue-load
BIN=${WORKER_BIN:-$ROOT/target/release/worker}
LOAD=$ROOT/target/release/examples/queue-load

WORK=$(mktemp -d)
AZ_PID=
# Never fails: under set -e a failing `wait` (143, Azurite's SIGTERM) would end
# the trap before rm and turn the script's status into 143.
cleanup() {
    if [ -n "$AZ_PID" ]; then
        kill "$AZ_PID" 2>/dev/null || true
        wait "$AZ_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=tests/bench/azurite.sh
. "$ROOT/tests/bench/azurite.sh"
start_azurite

now_ns() { date +%s%N; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
max() { sort -g | tail -1; }
# Runs "$@" under GNU time; sets WALL (s), CPU (user+sys s), RSS (KiB).
measure() {
    local t0 t1
    t0=$(now_ns)
    /usr/bin/time -f "%U %S %M" -o "$WORK/time" "$@"
    t1=$(now_ns)
    WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", (b-a)/1e9}')
    read -r u s RSS <"$WORK/time"
    CPU=$(awk -v u="$u" -v s="$s" 'BEGIN {printf "%.3f", u+s}')
}
expect_empty() {
    local left
    left=$("$LOAD" count "$1")
    [ "$left" = 0 ] || { echo "queue $1 still holds $left messages" >&2; exit 1; }
}

# ---- 1. throughput -----------------------------------------------------------
echo "throughput: $ROUNDS rounds of $N tasks..." >&2
: >"$WORK/ceil"; : >"$WORK/work"
run_ceiling() {
    local q=ceil-$1
    "$LOAD" fill "$q" "$N" 64 >/dev/null
    measure "$LOAD" drain "$q" 32 >"$WORK/drain.out"
    grep -q "messages=$N " "$WORK/drain.out" || { echo "ceiling drained $(cat "$WORK/drain.out")" >&2; exit 1; }
    expect_empty "$q"
    echo "$(awk -v n="$N" -v w="$WALL" 'BEGIN {print n/w}') $(awk -v c="$CPU" -v n="$N" 'BEGIN {print c/n*1000}') $RSS" >>"$WORK/ceil"
}
run_worker() {
    local client=bench$1
    "$LOAD" fill "$client-tasks" "$N" 64 >/dev/null
    measure env WORKER_CLIENT="$client" WORKER_BATCH_SIZE=32 WORKER_CONCURRENCY=$CONCURRENCY \
        "$BIN" poll --exit-when-empty 2>"$WORK/worker.log"
    grep -q "succeeded: $N," "$WORK/worker.log" || { echo "worker did not settle $N tasks:" >&2; tail "$WORK/worker.log" >&2; exit 1; }
    expect_empty "$client-tasks"
    echo "$(awk -v n="$N" -v w="$WALL" 'BEGIN {print n/w}') $(awk -v c="$CPU" -v n="$N" 'BEGIN {print c/n*1000}') $RSS" >>"$WORK/work"
}
# Warm-up (Azurite's JIT, the page cache), not counted.
"$LOAD" fill warmup "$N" 64 >/dev/null
"$LOAD" drain warmup 32 >/dev/null
for r in $(seq 1 "$ROUNDS"); do
    # Alternate the order so that neither side always runs on a fresher Azurite.
    if [ $((r % 2)) = 1 ]; then run_ceiling "$r"; run_worker "$r"; else run_worker "$r"; run_ceiling "$r"; fi
done
C_RATE=$(cut -d' ' -f1 "$WORK/ceil" | median)
C_CPU=$(cut -d' ' -f2 "$WORK/ceil" | median)
C_RSS=$(cut -d' ' -f3 "$WORK/ceil" | max)
W_RATE=$(cut -d' ' -f1 "$WORK/work" | median)
W_CPU=$(cut -d' ' -f2 "$WORK/work" | median)
W_RSS=$(cut -d' ' -f3 "$WORK/work" | max)

# ---- 2. idle cost ------------------------------------------------------------
echo "idle: ${IDLE_SECS}s on an empty queue, WORKER_MAX_POLL_INTERVAL=$IDLE_INTERVAL..." >&2
"$LOAD" fill idle-tasks 0 >/dev/null
t0=$(now_ns)
env WORKER_CLIENT=idle WORKER_MAX_POLL_INTERVAL="$IDLE_INTERVAL" RUST_LOG=warn,worker::poller=trace \
    /usr/bin/time -f "%U %S %M" -o "$WORK/idle.time" "$BIN" poll 2>"$WORK/idle.log" &
IDLE_PID=$!
sleep "$IDLE_SECS"
# The child of `time` is the worker.
kill -TERM "$(pgrep -P "$IDLE_PID")"
wait "$IDLE_PID"
read -r u s I_RSS <"$WORK/idle.time"
I_CPU=$(awk -v u="$u" -v s="$s" 'BEGIN {printf "%.3f", u+s}')
# Seconds since midnight of each empty receive, and its backoff.
grep "queue empty" "$WORK/idle.log" | sed 's/^[0-9-]*T\([0-9:.]*\)Z.*backoff_ms=\([0-9]*\).*/\1 \2/' |
    awk '{split($1, t, ":"); print t[1]*3600 + t[2]*60 + t[3], $2}' >"$WORK/idle.rx"
I_ALL=$(wc -l <"$WORK/idle.rx")
CAP_MS=$(awk -v i="$IDLE_INTERVAL" 'BEGIN {print int(i*1000)}')
# From the first receive after which the worker waits the full interval.
read -r I_CAPPED I_SPAN <<<"$(awk -v cap="$CAP_MS" '$2 == cap {if (!n) first = $1; n++; last = $1} END {print n, last - first}' "$WORK/idle.rx")"
I_BOUND=$(awk -v s="$I_SPAN" -v i="$IDLE_INTERVAL" 'BEGIN {print int(s / i) + 1}')
I_RAMP=$((I_ALL - I_CAPPED))

# ---- 3. job mode vs single-task mode ----------------------------------------
echo "job mode: $JOB_RUNS executions each..." >&2
: >"$WORK/job"; : >"$WORK/single"
for i in $(seq 1 "$JOB_RUNS"); do
    "$LOAD" fill job-tasks 1 1 >/dev/null
    measure env WORKER_CLIENT=job "$BIN" job 2>"$WORK/job.log" || { cat "$WORK/job.log" >&2; exit 1; }
    grep -q "task started" "$WORK/job.log" || { echo "job execution $i ran no task" >&2; exit 1; }
    echo "$WALL $RSS" >>"$WORK/job"
    measure env -u AZURE_STORAGE_CONNECTION_STRING TASK_DATA='{"task_id":"bench","task_type":"echo","payload":{"i":1}}' \
        "$BIN" >/dev/null 2>&1
    echo "$WALL $RSS" >>"$WORK/single"
done
expect_empty job-tasks
J_WALL=$(cut -d' ' -f1 "$WORK/job" | median)
J_RSS=$(cut -d' ' -f2 "$WORK/job" | median)
S_WALL=$(cut -d' ' -f1 "$WORK/single" | median)
S_RSS=$(cut -d' ' -f2 "$WORK/single" | median)

# ---- report ------------------------------------------------------------------
verdict() { if awk -v a="$1" -v b="$2" "BEGIN {exit !(a $3 b)}"; then echo "met"; else echo "MISSED"; fi; }
RATIO=$(awk -v w="$W_RATE" -v c="$C_RATE" 'BEGIN {printf "%.2f", w/c}')
MIB() { awk -v k="$1" 'BEGIN {printf "%.1f", k/1024}'; }
echo
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); Azurite $(node -p "require('$ROOT/tests/node_modules/azurite/package.json').version")"
echo
echo "1. draining $N echo tasks, batch 32, concurrency $CONCURRENCY (median of $ROUNDS rounds; RSS: max)"
printf "%-34s %10s %14s %10s\n" "" "msgs/s" "CPU s/1000" "peak RSS"
printf "%-34s %10.0f %14.3f %6s MiB\n" "ceiling (receive 32 + delete)" "$C_RATE" "$C_CPU" "$(MIB "$C_RSS")"
printf "%-34s %10.0f %14.3f %6s MiB\n" "worker poll --exit-when-empty" "$W_RATE" "$W_CPU" "$(MIB "$W_RSS")"
printf "%-34s %10s\n" "worker / ceiling" "$RATIO"
echo "   per round (msgs/s, CPU s/1000, RSS KiB): ceiling: $(tr '\n' ';' <"$WORK/ceil") worker: $(tr '\n' ';' <"$WORK/work")"
echo
echo "2. idle, empty queue, WORKER_MAX_POLL_INTERVAL=$IDLE_INTERVAL, ${IDLE_SECS}s"
echo "   receive calls: $I_ALL ($I_RAMP while backing off from 100 ms, then $I_CAPPED over ${I_SPAN}s; bound one per ${IDLE_INTERVAL}s: $I_BOUND)"
echo "   CPU over the whole run: ${I_CPU}s; peak RSS $(MIB "$I_RSS") MiB"
echo
echo "3. one echo task per process (median of $JOB_RUNS)"
printf "%-34s %10s %10s\n" "" "wall ms" "peak RSS"
printf "%-34s %10.1f %6s MiB\n" "single-task (TASK_DATA)" "$(awk -v w="$S_WALL" 'BEGIN {print w*1000}')" "$(MIB "$S_RSS")"
printf "%-34s %10.1f %6s MiB\n" "job (lease, settle, exit)" "$(awk -v w="$J_WALL" 'BEGIN {print w*1000}')" "$(MIB "$J_RSS")"
printf "%-34s %10.2f %10.2f\n" "job / single-task" "$(awk -v a="$J_WALL" -v b="$S_WALL" 'BEGIN {print a/b}')" "$(awk -v a="$J_RSS" -v b="$S_RSS" 'BEGIN {print a/b}')"
echo
echo "targets:"
echo "   worker / ceiling >= 0.9:        $RATIO  $(verdict "$RATIO" 0.9 '>=')"
echo "   CPU s per 1000 tasks <= 0.6:    $W_CPU  $(verdict "$W_CPU" 0.6 '<=')"
echo "   peak RSS <= 16 MiB:             $(MIB "$W_RSS")  $(verdict "$W_RSS" 16384 '<=')"
echo "   idle receives <= 1 per interval: $I_CAPPED <= $I_BOUND  $(verdict "$I_CAPPED" "$I_BOUND" '<=')"
