#!/usr/bin/env bash
# Python handlers in polling mode, against a local Azurite, measured side by
# side in one run (figures are only meaningful as ratios on the same machine).
# One handler module for every side (tests/bench/persistent/bench_handlers.py:
# imports `requests`, hashes its payload), N tasks at concurrency 8:
#
#  - persistent: `worker poll --exit-when-empty` with a long-lived handler
#    (`function = "bench_handlers:hash_payload"`, the default pool);
#  - python: an asyncio worker on the official SDK (azure-storage-queue, pinned
#    in tests/bench/persistent/requirements.txt) calling the function
#    in-process (tests/bench/persistent/sdk_worker.py), what teams run today;
#  - exec: the worker with an exec handler (one interpreter per task), for
#    reference.
#
# Then the same for an I/O-bound `async def` (each task awaits 200 ms):
# persistent vs python.
#
# Figures per side: throughput (tasks / wall time), CPU seconds per 1000 tasks
# and peak RSS, both of the whole process tree (the worker and its handler
# processes; tests/bench/persistent/measure.py), median of ROUNDS rounds (RSS:
# max), sides alternating in order; and the ratios persistent / python.
#
# Usage: bash tests/bench/persistent.sh   (env: N ROUNDS EXEC_N;
#        WORKER_BIN=path measures another build of the worker)
# Needs: Node.js 20+ and npm (Azurite), Python 3.9+ with venv (the SDK worker
# and the handlers; the packages are installed from PyPI into
# target/bench-persistent-venv the first time).
set -euo pipefail

N=${N:-400}
EXEC_N=${EXEC_N:-200}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=8

cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH=$ROOT/tests/bench/persistent
command -v node >/dev/null || { echo "Node.js 20+ and npm are needed for Azurite" >&2; exit 1; }
python3 -m venv --help >/dev/null 2>&1 || { echo "Python 3 with venv is needed (Debian: apt-get install python3 python3-venv)" >&2; exit 1; }

VENV=$ROOT/target/bench-persistent-venv
PY=$VENV/bin/python
if ! cmp -s "$BENCH/requirements.txt" "$VENV/requirements.txt"; then
    echo "installing the Python side into $VENV..." >&2
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check -r "$BENCH/requirements.txt"
    cp "$BENCH/requirements.txt" "$VENV/requirements.txt"
fi

echo "building (release)..." >&2
cargo build --release --locked --quiet --bin worker --example queue-load
BIN=${WORKER_BIN:-$ROOT/target/release/worker}
LOAD=$ROOT/target/release/examples/queue-load

WORK=$(mktemp -d)
AZ_PID=
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

cat >"$WORK/handlers.toml" <<EOF
[handlers.hash]
function = "bench_handlers:hash_payload"
python = "$PY"
working_dir = "$BENCH"

[handlers.wait]
function = "bench_handlers:wait_io"
python = "$PY"
working_dir = "$BENCH"

[handlers.hash_exec]
command = ["$PY", "exec_handler.py"]
working_dir = "$BENCH"
EOF

# Runs "$@" under measure.py; sets WALL (s), CPU (s), RSS (KiB).
measure() {
    python3 "$BENCH/measure.py" "$WORK/m" -- "$@"
    read -r WALL CPU RSS code <"$WORK/m"
    [ "$code" = 0 ] || { echo "exit $code: $*" >&2; exit 1; }
}
expect_empty() {
    local left
    left=$("$LOAD" count "$1")
    [ "$left" = 0 ] || { echo "queue $1 still holds $left messages" >&2; exit 1; }
}
record() { # file n
    echo "$(awk -v n="$2" -v w="$WALL" 'BEGIN {print n/w}') $(awk -v c="$CPU" -v n="$2" 'BEGIN {print c/n*1000}') $RSS" >>"$1"
}
run_worker() { # side task_type n round
    local client=$1$4
    TASK_TYPE=$2 "$LOAD" fill "$client-tasks" "$3" 32 >/dev/null
    measure env WORKER_CLIENT="$client" WORKER_HANDLERS_FILE="$WORK/handlers.toml" \
        WORKER_BATCH_SIZE=32 WORKER_CONCURRENCY=$CONCURRENCY \
        "$BIN" poll --exit-when-empty 2>"$WORK/worker.log"
    grep -q "succeeded: $3," "$WORK/worker.log" || {
        echo "worker did not settle $3 tasks:" >&2; tail "$WORK/worker.log" >&2; exit 1; }
    expect_empty "$client-tasks"
    record "$WORK/$1" "$3"
}
run_python() { # side function n round
    local q=$1$4
    "$LOAD" fill "$q" "$3" 32 >/dev/null
    (cd "$BENCH" && measure env CONCURRENCY=$CONCURRENCY "$PY" sdk_worker.py "$q" "$2" >"$WORK/sdk.out")
    read -r WALL CPU RSS code <"$WORK/m"
    [ "$(cat "$WORK/sdk.out")" = "$3" ] || { echo "the SDK worker did $(cat "$WORK/sdk.out") of $3 tasks" >&2; exit 1; }
    expect_empty "$q"
    record "$WORK/$1" "$3"
}

# The worker logs its summary at info; everything else at warn.
export RUST_LOG=warn,worker::poller=info
: >"$WORK/persistent"; : >"$WORK/python"; : >"$WORK/exec"; : >"$WORK/apersistent"; : >"$WORK/apython"
# Warm-up (Azurite's JIT, the page cache, .pyc files), not counted.
run_worker warm hash 100 0; run_python warmpy bench_handlers:hash_payload 100 0
echo "hash handler: $ROUNDS rounds of $N tasks (exec: $EXEC_N)..." >&2
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        run_worker persistent hash "$N" "$r"; run_python python bench_handlers:hash_payload "$N" "$r"
    else
        run_python python bench_handlers:hash_payload "$N" "$r"; run_worker persistent hash "$N" "$r"
    fi
    run_worker exec hash_exec "$EXEC_N" "$r"
done
echo "async handler (awaits 200 ms): $ROUNDS rounds of $N tasks..." >&2
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        run_worker apersistent wait "$N" "$r"; run_python apython bench_handlers:wait_io "$N" "$r"
    else
        run_python apython bench_handlers:wait_io "$N" "$r"; run_worker apersistent wait "$N" "$r"
    fi
done

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
max() { sort -g | tail -1; }
col() { cut -d' ' -f"$2" "$WORK/$1"; }
MIB() { awk -v k="$1" 'BEGIN {printf "%.1f", k/1024}'; }
rate() { col "$1" 1 | median; }
cpu() { col "$1" 2 | median; }
rss() { col "$1" 3 | max; }
RATE_persistent=$(rate persistent); CPU_persistent=$(cpu persistent); RSS_persistent=$(rss persistent)
RATE_python=$(rate python); CPU_python=$(cpu python); RSS_python=$(rss python)
RATE_exec=$(rate exec); CPU_exec=$(cpu exec); RSS_exec=$(rss exec)
RATE_apersistent=$(rate apersistent); CPU_apersistent=$(cpu apersistent); RSS_apersistent=$(rss apersistent)
RATE_apython=$(rate apython); CPU_apython=$(cpu apython); RSS_apython=$(rss apython)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
verdict() { if awk -v a="$1" -v b="$2" "BEGIN {exit !(a $3 b)}"; then echo "met"; else echo "MISSED"; fi; }
row() { # label side
    local rate=RATE_$2 cpu=CPU_$2 rss=RSS_$2
    printf "%-44s %10.1f %14.2f %8s MiB\n" "$1" "${!rate}" "${!cpu}" "$(MIB "${!rss}")"
}

echo
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $("$PY" --version); azure-storage-queue $("$PY" -c 'import azure.storage.queue as q; print(q.__version__)')"
echo "command: bash tests/bench/persistent.sh   (N=$N EXEC_N=$EXEC_N ROUNDS=$ROUNDS, concurrency $CONCURRENCY)"
echo
echo "1. hash handler (imports requests, hashes its payload): median of $ROUNDS rounds; RSS: max, whole process tree"
printf "%-44s %10s %14s %12s\n" "" "tasks/s" "CPU s/1000" "peak RSS"
row "worker, long-lived handler (default pool)" persistent
row "Python asyncio worker, SDK, in-process" python
row "worker, exec handler ($EXEC_N tasks)" exec
T=$(ratio "$RATE_persistent" "$RATE_python"); C=$(ratio "$CPU_persistent" "$CPU_python"); M=$(ratio "$RSS_persistent" "$RSS_python")
printf "%-44s %10s %14s %12s\n" "long-lived / Python in-process" "$T" "$C" "$M"
printf "%-44s %10s %14s %12s\n" "exec / Python in-process" "$(ratio "$RATE_exec" "$RATE_python")" "$(ratio "$CPU_exec" "$CPU_python")" "$(ratio "$RSS_exec" "$RSS_python")"
echo
echo "2. async handler (awaits 200 ms): median of $ROUNDS rounds"
printf "%-44s %10s %14s %12s\n" "" "tasks/s" "CPU s/1000" "peak RSS"
row "worker, long-lived handler (default pool)" apersistent
row "Python asyncio worker, SDK, in-process" apython
A=$(ratio "$RATE_apersistent" "$RATE_apython")
printf "%-44s %10s %14s %12s\n" "long-lived / Python in-process" "$A" "$(ratio "$CPU_apersistent" "$CPU_apython")" "$(ratio "$RSS_apersistent" "$RSS_apython")"
echo
echo "   per round (tasks/s, CPU s/1000, RSS KiB):"
for s in persistent python exec apersistent apython; do echo "   $s: $(tr '\n' ';' <"$WORK/$s")"; done
echo
echo "targets (long-lived / Python in-process):"
echo "   throughput >= 1.0:          $T  $(verdict "$T" 1.0 '>=')"
echo "   CPU per task <= 1.0:        $C  $(verdict "$C" 1.0 '<=')"
echo "   peak RSS of the tree <= 1.0: $M  $(verdict "$M" 1.0 '<=')"
echo "   async throughput >= 1.0:    $A  $(verdict "$A" 1.0 '>=')"
