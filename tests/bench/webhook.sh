#!/usr/bin/env bash
# What webhook delivery costs, against a local Azurite and local receivers
# (tests/bench/hook_sink.py), measured side by side in one run (figures are
# only meaningful as ratios on the same machine). Every worker run drains N
# echo tasks with `worker poll` (batch 32, concurrency 32):
#
#  (a) no webhooks: N / the time from the worker's start to its last task's
#      end (`--exit-when-empty`; as (c) and (d) count to the last webhook).
#  (b) the receiver alone: Python's standard `ThreadingHTTPServer` as a backend
#      team writes it in a few lines: defaults kept (listen queue of 5, HTTP/1.0
#      so every answer closes its connection), 200 at once, each distinct
#      webhook-id recorded. The load generator (tests/bench/hook_load.rs) posts
#      for GEN_SECS from 1, 4 and 16 connections; each rate is printed, the
#      best one is (b). Resets and timeouts are counted, not fatal.
#      (b500): the same receiver answering after DELAY_MS, from SLOW_CONNS
#      connections started evenly over DELAY_MS (a steady client, no bursts
#      of new connections): what that slow receiver can take at all, the
#      ceiling (d) is measured against.
#  (c) the worker reporting N outcomes to that receiver: N / the time from the
#      worker's start until the receiver holds all N distinct webhook-ids.
#      Targets: c/b >= 0.8 and c/a >= 0.5.
#  (d) the same with the receiver answering each webhook after DELAY_MS (a
#      thread per request, so a slow backend that takes any parallelism it is
#      given). Target: d/c >= 0.8.
#  (d') the same 500 ms app served the way Flask's development server
#      (werkzeug) serves a threaded app, as `flask run` gives a small backend:
#      a listen queue of 128 and HTTP/1.1 keep-alive. (d) measures what a
#      listen queue of 5 and a new connection per request cost at this
#      parallelism (on a 2-core machine whose cores Azurite and the worker
#      keep busy, the receiver's accept thread waits for a core and its queue
#      overflows: (b500) beside two busy loops drops by about a quarter);
#      (d') whether the worker gives a slow but healthy backend the
#      parallelism it needs. Target: d'/c >= 0.8.
#  (e) two clients, WORKER_CLIENT=a,b (queues a-tasks and b-tasks, N each): a's
#      webhooks go to the receiver on 127.0.0.1, b's to a black-holed host on
#      127.0.0.2 (listens, never answers). a's rate (until the receiver holds
#      all of a's ids) with b present, against a's rate alone (the same
#      configuration with b's N tasks queued but not consumed: Azurite slows
#      down with every message it holds, in any queue, which Azure Storage
#      does not, so both runs hold the same). Target: >= 0.8. The worker is then stopped
#      with SIGTERM (WORKER_SHUTDOWN_GRACE=GRACE, bounded wait) since b's
#      outcomes can never be delivered; they must be in the outbox b-webhooks
#      or still in b-tasks (approximate counts): "lost" must be 0.
#
# Medians over ROUNDS rounds (peak RSS: the maximum), per-round figures, a
# table with PASS/FAIL against each target and the exact command are printed.
# A run whose receiver does not hold all its ids within WAIT_SECS is stopped
# with SIGTERM; its figure is the ids received / the time waited, marked
# "incomplete". Exit status 0 unless the benchmark itself could not run (a
# missed target is a FAIL line, not an error).
#
# Usage: bash tests/bench/webhook.sh   (a few minutes; a build that reaches
#        WAIT_SECS in (c), (d) and (e) takes about 5 minutes a round)
# Env:   N=2000         tasks per worker run (per client in (e))
#        ROUNDS=3       rounds; medians are reported
#        DELAY_MS=500   the slow receiver's delay in (d)
#        GEN_SECS=3     seconds per concurrency level of the load generator in (b)
#        WAIT_SECS=60   bound on one worker run (all ids in, or the worker's exit)
#        GRACE=2        WORKER_SHUTDOWN_GRACE for the SIGTERM in (e)
#        KEEP_WORK=1    keeps the worker, Azurite and receiver logs (path printed)
#        WORKER_BIN=path  measures another build of the worker (before/after);
#                       only its CLI and environment are used.
# Needs: Node.js 20+ and npm (Azurite), Python 3 (the receivers), GNU time at
#        /usr/bin/time, pgrep. Loopback only (127.0.0.1 and 127.0.0.2).
set -euo pipefail

N=${N:-2000}
ROUNDS=${ROUNDS:-3}
DELAY_MS=${DELAY_MS:-500}
GEN_SECS=${GEN_SECS:-3}
WAIT_SECS=${WAIT_SECS:-60}
GRACE=${GRACE:-2}
CONCURRENCY=32
SLOW_CONNS=256    # (b500): connections to the slow receiver
STOP_SECS=30      # bound from SIGTERM to the worker's exit before SIGKILL
COMMAND="N=$N ROUNDS=$ROUNDS DELAY_MS=$DELAY_MS GEN_SECS=$GEN_SECS WAIT_SECS=$WAIT_SECS GRACE=$GRACE${WORKER_BIN:+ WORKER_BIN=$WORKER_BIN} bash tests/bench/webhook.sh"

cd "$(dirname "$0")/../.."
ROOT=$PWD
[ -x /usr/bin/time ] || { echo "GNU time is needed at /usr/bin/time (apt-get install time)" >&2; exit 1; }
command -v node >/dev/null || { echo "Node.js 20+ and npm are needed for Azurite" >&2; exit 1; }
command -v python3 >/dev/null || { echo "Python 3 is needed for the webhook receivers" >&2; exit 1; }
command -v pgrep >/dev/null || { echo "pgrep is needed (apt-get install procps)" >&2; exit 1; }

echo "building (release)..." >&2
cargo build --release --locked --quiet --bin worker --example queue-load --example hook-load
BIN=${WORKER_BIN:-$ROOT/target/release/worker}
LOAD=$ROOT/target/release/examples/queue-load
GEN=$ROOT/target/release/examples/hook-load
[ -x "$BIN" ] || { echo "WORKER_BIN=$BIN is not an executable" >&2; exit 1; }

WORK=$(mktemp -d)
mkdir "$WORK/hooks"
AZ_PID=
SINK_PID=
WERKZEUG_PID=
HOLE_PID=
TIME_PID=
WORKER_PID=
# Never fails: under set -e a failing `wait` (143, the child's SIGTERM) would
# end the trap early, leaving processes running and the script's status 143.
cleanup() {
    local pid
    [ -n "$WORKER_PID" ] && kill -KILL "$WORKER_PID" 2>/dev/null
    for pid in $TIME_PID $HOLE_PID $WERKZEUG_PID $SINK_PID $AZ_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "${KEEP_WORK:-}" ]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# shellcheck source=tests/bench/azurite.sh
. "$ROOT/tests/bench/azurite.sh"
start_azurite

# Starts hook_sink.py with "$@" in the background; sets STARTED_PID and
# STARTED_PORT once it listens (bounded wait).
start_receiver() {
    local name=$1
    shift
    python3 "$ROOT/tests/bench/hook_sink.py" --port-file "$WORK/$name.port" "$@" 2>"$WORK/$name.err" &
    STARTED_PID=$!
    STARTED_PORT=
    for _ in $(seq 1 100); do
        [ -s "$WORK/$name.port" ] && STARTED_PORT=$(cat "$WORK/$name.port") && break
        kill -0 "$STARTED_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$STARTED_PORT" ] || { echo "the $name receiver did not start:" >&2; cat "$WORK/$name.err" >&2; exit 1; }
}
# One receiver process for every run: each run posts to its own path, so runs
# never mix; the delay rides in the query (/<run>?delay_ms=D).
start_receiver sink --log-dir "$WORK/hooks"
SINK_PID=$STARTED_PID
HOOK=127.0.0.1:$STARTED_PORT
start_receiver werkzeug --werkzeug --log-dir "$WORK/hooks"
WERKZEUG_PID=$STARTED_PID
HOOK_W=127.0.0.1:$STARTED_PORT
# A different host, so that a per-host limit cannot confuse the two.
start_receiver hole --blackhole --host 127.0.0.2
HOLE_PID=$STARTED_PID
HOLE=127.0.0.2:$STARTED_PORT
# The egress guard refuses loopback unless the host:port is allowed by name.
export WORKER_WEBHOOK_ALLOWED_HOSTS=$HOOK,$HOOK_W,$HOLE

now_ns() { date +%s%N; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
max() { sort -g | tail -1; }
# "count last_ns": distinct webhook-ids the receiver holds for run $1, and when
# it recorded the last of them.
ids() {
    if [ -f "$WORK/hooks/$1.log" ]; then awk 'END {print NR, $2}' "$WORK/hooks/$1.log"; else echo "0 0"; fi
}
# fill CLIENT [WEBHOOK_URL [COUNT]]: COUNT (default N) echo tasks into CLIENT-tasks.
fill() { "$LOAD" fill "$1-tasks" "${3:-$N}" 64 ${2:+"$2"} >/dev/null; }
# A queue's approximate count (leased messages included); 0 for a queue never
# written to (the worker creates an outbox at its first entry); "?" on error.
count() {
    local out
    if out=$("$LOAD" count "$1" 2>&1); then echo "$out"
    elif grep -q "does not exist" <<<"$out"; then echo 0
    else echo "?"; fi
}

# A fresh in-memory Azurite for every worker run: Azurite gets slower with
# every message it holds (in any queue) and stalls for seconds after a few
# runs of thousands, which the real service does not do; each run starts
# from the same empty one.
fresh_azurite() {
    kill "$AZ_PID" 2>/dev/null || true
    wait "$AZ_PID" 2>/dev/null || true
    start_azurite
}

# Starts `worker poll "$@"` for clients $2 under GNU time, in the background;
# $1 names its files. Sets START (ns), TIME_PID, WORKER_PID.
start_worker() {
    local label=$1 clients=$2
    shift 2
    LABEL=$label
    START=$(now_ns)
    env WORKER_CLIENT="$clients" WORKER_BATCH_SIZE=32 WORKER_CONCURRENCY=$CONCURRENCY \
        WORKER_SHUTDOWN_GRACE="$GRACE" \
        /usr/bin/time -f "%e %M" -o "$WORK/$label.time" "$BIN" poll "$@" 2>"$WORK/$label.log" &
    TIME_PID=$!
    WORKER_PID=
    for _ in $(seq 1 200); do
        WORKER_PID=$(pgrep -P "$TIME_PID" || true)
        [ -n "$WORKER_PID" ] && break
        kill -0 "$TIME_PID" 2>/dev/null || break
        sleep 0.02
    done
}
# Waits (bounded by $1 seconds) while the worker runs and, if $2 is given,
# until the receiver holds $3 ids of run $2.
wait_for() {
    local deadline=$((SECONDS + $1)) run=${2:-} want=${3:-0} got
    while [ "$SECONDS" -lt "$deadline" ] && kill -0 "$TIME_PID" 2>/dev/null; do
        if [ -n "$run" ]; then
            read -r got _ < <(ids "$run")
            [ "$got" -ge "$want" ] && return 0
        fi
        sleep 0.05
    done
    # The worker has exited: the last answers are at most a moment behind.
    [ -n "$run" ] && sleep 0.5
    return 0
}
# SIGTERM if still running, then a bounded wait, then SIGKILL. Sets STATUS
# (the worker's), STOP_S (SIGTERM to exit, or "-"), RSS (KiB).
stop_worker() {
    local t0 deadline
    STOP_S=-
    if kill -0 "$TIME_PID" 2>/dev/null; then
        t0=$(now_ns)
        deadline=$((SECONDS + STOP_SECS))
        kill -TERM "$WORKER_PID" 2>/dev/null || true
        while [ "$SECONDS" -lt "$deadline" ] && kill -0 "$TIME_PID" 2>/dev/null; do sleep 0.05; done
        if kill -0 "$TIME_PID" 2>/dev/null; then
            echo "note: $LABEL: the worker was still running ${STOP_SECS}s after SIGTERM; killed" >&2
            kill -KILL "$WORKER_PID" 2>/dev/null || true
        fi
        STOP_S=$(awk -v a="$t0" -v b="$(now_ns)" 'BEGIN {printf "%.1f", (b-a)/1e9}')
    fi
    STATUS=0
    wait "$TIME_PID" || STATUS=$?
    TIME_PID=
    WORKER_PID=
    # The last line: GNU time puts "Command exited with non-zero status" first.
    read -r _ RSS < <(tail -1 "$WORK/$LABEL.time")
}
# Rate for run $1 from START: N / time to the N-th id, or, when fewer
# arrived, the ids so far / the time waited (COMPLETE=0, "incomplete").
# Sets RATE, GOT, COMPLETE (1/0).
hook_rate() {
    local last
    read -r GOT last < <(ids "$1")
    if [ "$GOT" -ge "$N" ]; then
        COMPLETE=1
        RATE=$(awk -v n="$N" -v a="$START" -v b="$last" 'BEGIN {printf "%.1f", n/((b-a)/1e9)}')
    else
        COMPLETE=0
        RATE=$(awk -v n="$GOT" -v a="$START" -v b="$(now_ns)" 'BEGIN {printf "%.1f", n/((b-a)/1e9)}')
        echo "note: $1: the receiver holds $GOT of $N ids; stopped waiting after ${WAIT_SECS}s" >&2
    fi
}
settled() {
    grep -q "succeeded: $N," "$WORK/$LABEL.log" ||
        echo "note: $LABEL: the worker did not report $N tasks settled (status $STATUS): $(tail -1 "$WORK/$LABEL.log")" >&2
}

# (a) no webhooks; appends "rate rss" to $WORK/a.
run_a() {
    local client=plain$1
    fresh_azurite
    fill "$client"
    start_worker "$client" "$client" --exit-when-empty
    wait_for "$WAIT_SECS"
    stop_worker
    settled
    # Up to the last task's end, as (c) and (d) count up to the last
    # webhook: not the worker's start-up, nor its wait to see the queue empty.
    local last
    last=$(grep "task succeeded" "$WORK/$LABEL.log" | tail -1 | cut -d' ' -f1)
    if [ -n "$last" ]; then
        echo "$(awk -v n="$N" -v a="$START" -v b="$(date -d "$last" +%s%N)" 'BEGIN {printf "%.1f", n/((b-a)/1e9)}') $RSS" >>"$WORK/a"
    else
        echo "0 $RSS" >>"$WORK/a"
    fi
}
# (b) the receiver alone; appends "best rate_c1 rate_c4 rate_c16" to $WORK/b
# and each generator line to $WORK/b.lines.
run_b() {
    local c line rates=() best=0
    for c in 1 4 16; do
        line=$(timeout -k 5 $((GEN_SECS + 30)) "$GEN" "http://$HOOK/gen$1-c$c" "$c" "$GEN_SECS")
        echo "round $1: $line" >>"$WORK/b.lines"
        rates+=("${line##*rate=}")
    done
    best=$(printf '%s\n' "${rates[@]}" | max)
    echo "$best ${rates[*]}" >>"$WORK/b"
    line=$(timeout -k 5 $((GEN_SECS + 30)) "$GEN" "http://$HOOK/gen$1-slow?delay_ms=$DELAY_MS" \
        "$SLOW_CONNS" "$GEN_SECS" "$DELAY_MS")
    echo "round $1: $line" >>"$WORK/b.lines"
    echo "${line##*rate=}" >>"$WORK/b500"
}
# (c), (d) and (d'): $2 is the file and run prefix, $3 the delay in ms, $4
# the receiver (host:port); appends "rate rss complete" to $WORK/$2.
run_hooks() {
    local client=$2$1 query=
    fresh_azurite
    [ "$3" -gt 0 ] && query="?delay_ms=$3"
    fill "$client" "http://$4/$client$query"
    start_worker "$client" "$client" --exit-when-empty
    wait_for "$WAIT_SECS" "$client" "$N"
    hook_rate "$client"
    # Let the worker exit by itself (all settled), within a bound.
    [ "$COMPLETE" = 1 ] && wait_for "$STOP_SECS"
    stop_worker
    settled
    echo "$RATE $RSS $COMPLETE" >>"$WORK/$2"
}
# (e) alone: client "solo" to the receiver; appends "rate rss complete" to
# $WORK/e1.
run_e_alone() {
    local client=solo$1
    fresh_azurite
    fill "$client" "http://$HOOK/$client"
    # b's tasks sit in Azurite here too, unconsumed: Azurite's calls get
    # slower with every message it holds (any queue), which the real service
    # does not do. Without them "alone" would measure a smaller emulator.
    fill "idle$1" "http://$HOLE/idle$1"
    start_worker "$client" "$client"
    wait_for "$WAIT_SECS" "$client" "$N"
    hook_rate "$client"
    stop_worker
    echo "$RATE $RSS $COMPLETE" >>"$WORK/e1"
}
# (e) with b: appends "rate rss complete stop_s b_outbox b_tasks b_poison
# lost" to $WORK/e2.
run_e_both() {
    local a=a$1 b=b$1 outbox tasks poison lost
    fresh_azurite
    fill "$a" "http://$HOOK/$a"
    fill "$b" "http://$HOLE/$b"
    start_worker "$a+$b" "$a,$b"
    wait_for "$WAIT_SECS" "$a" "$N"
    hook_rate "$a"
    stop_worker
    outbox=$(count "$b-webhooks")
    tasks=$(count "$b-tasks")
    poison=$(( $(count "$b-webhooks-poison" | tr -c '0-9\n' 0) + $(count "$b-tasks-poison" | tr -c '0-9\n' 0) ))
    # Counted twice (more than N in all): an outcome already in the outbox
    # whose task message was not yet deleted; the same webhook-id, no loss.
    lost=$(awk -v n="$N" -v o="$outbox" -v t="$tasks" -v p="$poison" \
        'BEGIN {if (o ~ /^[0-9]+$/ && t ~ /^[0-9]+$/) print (o + t + p < n ? n - o - t - p : 0); else print "?"}')
    echo "$RATE $RSS $COMPLETE $STOP_S $outbox $tasks $poison $lost" >>"$WORK/e2"
}

# Warm-up (Azurite's JIT, the page cache, the receiver), not counted.
echo "warm-up..." >&2
fill warmup "http://$HOOK/warmup" 200
start_worker warmup warmup --exit-when-empty
wait_for "$WAIT_SECS"
stop_worker

for r in $(seq 1 "$ROUNDS"); do
    echo "round $r of $ROUNDS: (a) no webhooks..." >&2
    run_a "$r"
    echo "round $r: (b) the receiver alone, ${GEN_SECS}s each from 1, 4, 16 connections..." >&2
    run_b "$r"
    echo "round $r: (c) the worker to the receiver..." >&2
    run_hooks "$r" c 0 "$HOOK"
    echo "round $r: (d) the worker to the receiver answering after ${DELAY_MS} ms..." >&2
    run_hooks "$r" d "$DELAY_MS" "$HOOK"
    echo "round $r: (d') the same, served as Flask's development server serves it..." >&2
    run_hooks "$r" dw "$DELAY_MS" "$HOOK_W"
    echo "round $r: (e) client a alone, and beside client b whose host is black-holed..." >&2
    # Alternate the order so that neither side always runs on a fresher Azurite.
    if [ $((r % 2)) = 1 ]; then run_e_alone "$r"; run_e_both "$r"; else run_e_both "$r"; run_e_alone "$r"; fi
done

# ---- report ------------------------------------------------------------------
col() { cut -d' ' -f"$2" "$WORK/$1"; }
med() { col "$1" "$2" | median; }
MIB() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k/1024}'; }
rss() { MIB "$(col "$1" 2 | max)"; }
# " (incomplete)" when a run of $1 did not get all its ids within WAIT_SECS.
partial() { awk '$3 == 0 {p = 1} END {if (p) print " (incomplete)"}' "$WORK/$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a/b; else print "0.00"}'; }
mark() { if awk -v a="$1" -v t="$2" 'BEGIN {exit !(a >= t)}'; then echo PASS; else echo FAIL; fi; }
A=$(med a 1); B=$(med b 1); B500=$(med b500 1); C=$(med c 1); D=$(med d 1); DW=$(med dw 1); E1=$(med e1 1); E2=$(med e2 1)
CB=$(ratio "$C" "$B"); CA=$(ratio "$C" "$A"); DC=$(ratio "$D" "$C"); DWC=$(ratio "$DW" "$C"); DB=$(ratio "$D" "$B500"); EE=$(ratio "$E2" "$E1")
echo
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); Azurite $(node -p "require('$ROOT/tests/node_modules/azurite/package.json').version"); Python $(python3 -c 'import platform; print(platform.python_version())')"
echo "worker: $BIN"
echo "command: $COMMAND"
echo
echo "$N echo tasks per worker run, batch 32, concurrency $CONCURRENCY; median of $ROUNDS rounds (peak RSS: max)"
printf "%-58s %10s %12s\n" "" "per second" "peak RSS"
printf "%-58s %10.0f %12s\n" "(a) no webhooks (tasks/s)" "$A" "$(rss a)"
printf "%-58s %10.0f %12s\n" "(b) receiver alone, best of 1/4/16 connections (req/s)" "$B" "-"
for i in 1 2 3; do
    c=$(echo "1 4 16" | cut -d' ' -f"$i")
    printf "%-58s %10.0f\n" "      from $c connection(s)" "$(med b $((i + 1)))"
done
printf "%-58s %10.0f %12s\n" "(b500) receiver alone answering after ${DELAY_MS} ms, ${SLOW_CONNS} conns" "$B500" "-"
printf "%-58s %10.0f %12s\n" "(c) worker -> receiver (outcomes/s)$(partial c)" "$C" "$(rss c)"
printf "%-58s %10.0f %12s\n" "(d) worker -> receiver answering after ${DELAY_MS} ms$(partial d)" "$D" "$(rss d)"
printf "%-58s %10.0f %12s\n" "(d') the same, listen queue 128 + keep-alive (werkzeug)$(partial dw)" "$DW" "$(rss dw)"
printf "%-58s %10.0f %12s\n" "(e) client a alone (a's outcomes/s)$(partial e1)" "$E1" "$(rss e1)"
printf "%-58s %10.0f %12s\n" "(e) client a beside b, b's host black-holed$(partial e2)" "$E2" "$(rss e2)"
echo
echo "targets:"
printf "   %-40s %6s  %s\n" "c / b >= 0.8  (receiver's capacity)" "$CB" "$(mark "$CB" 0.8)"
printf "   %-40s %6s  %s\n" "c / a >= 0.5  (cost of reporting)" "$CA" "$(mark "$CA" 0.5)"
printf "   %-40s %6s  %s\n" "d / c >= 0.8  (a ${DELAY_MS} ms backend)" "$DC" "$(mark "$DC" 0.8)"
printf "   %-40s %6s\n" "d / b500 (share of what it can take)" "$DB"
printf "   %-40s %6s  %s\n" "d' / c >= 0.8 (the same, as werkzeug serves)" "$DWC" "$(mark "$DWC" 0.8)"
printf "   %-40s %6s  %s\n" "e: a beside b / a alone >= 0.8" "$EE" "$(mark "$EE" 0.8)"
LOST=$(col e2 8 | awk '$1 != 0 {bad = bad " " $1} END {print (bad == "" ? 0 : bad)}')
printf "   %-40s %6s  %s\n" "b's outcomes lost = 0" "$LOST" "$([ "$LOST" = 0 ] && echo PASS || echo FAIL)"
echo
echo "per round:"
echo "   (a) tasks/s, RSS KiB:               $(tr '\n' ';' <"$WORK/a")"
echo "   (b) best, c=1, c=4, c=16 req/s:     $(tr '\n' ';' <"$WORK/b")"
echo "   (b500) req/s:                       $(tr '\n' ';' <"$WORK/b500")"
sed 's/^/       /' "$WORK/b.lines"
echo "   (c) outcomes/s, RSS KiB, complete:  $(tr '\n' ';' <"$WORK/c")"
echo "   (d) outcomes/s, RSS KiB, complete:  $(tr '\n' ';' <"$WORK/d")"
echo "   (d') outcomes/s, RSS KiB, complete: $(tr '\n' ';' <"$WORK/dw")"
echo "   (e) a alone:                        $(tr '\n' ';' <"$WORK/e1")"
echo "   (e) a beside b (+ SIGTERM to exit s, b in b-webhooks, b still in b-tasks, b poisoned, b lost):"
echo "                                       $(tr '\n' ';' <"$WORK/e2")"
echo "   b's counts are the queues' approximate message counts after the worker exited (GRACE=$GRACE),"
echo "   leased messages included: a task whose outcome had not reached the outbox by the exit"
echo "   is still in b-tasks and runs again when its lease expires;"
echo "   lost = N - outbox - still queued - poisoned (0 when more than N are counted: an outcome in the"
echo "   outbox whose task message was not deleted yet is counted twice, with one webhook-id)."
