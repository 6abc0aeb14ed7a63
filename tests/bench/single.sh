#!/usr/bin/env bash
# Start-up cost of single-task mode: one `echo` task from TASK_DATA, no
# webhook, measured from exec to exit, next to /bin/true in the same run.
#
#   tests/bench/single.sh [RUNS]        (default 30; at least 20)
#
# Prints the median wall time (hyperfine when installed, else a plain loop
# timed with `date +%s%N`) and the peak RSS of every run (GNU time's %M),
# median and max, plus worker / true ratios. Targets on a 2-core machine:
# median <= 5 ms, peak RSS <= 8 MiB.
#
# Needs GNU time at /usr/bin/time (Debian/Ubuntu: `apt-get install time`).
# hyperfine is optional (`apt-get install hyperfine`); BENCH_LOOP=1 forces the
# plain loop even when it is installed.
set -euo pipefail

RUNS=${1:-30}
if (( RUNS < 20 )); then
    echo "RUNS must be at least 20 (got $RUNS)" >&2
    exit 2
fi
if [[ ! -x /usr/bin/time ]]; then
    echo "GNU time is missing: install it with 'apt-get install time' (Debian/Ubuntu)" >&2
    exit 2
fi

cd "$(dirname "$0")/../.."
cargo build --release --quiet
BIN=$PWD/target/release/worker
TRUE=/bin/true

# Nothing from the caller's environment may change what the worker does.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(WORKER_|AZURE_|RUST_LOG$|TASK_DATA$)' || true)
export TASK_DATA='{"task_id":"bench","task_type":"echo","payload":{"n":1}}'

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The task must actually succeed, or we would be timing an error path.
if ! "$BIN" >"$tmp/out" 2>"$tmp/err" || ! grep -q '"task.succeeded"' "$tmp/out"; then
    echo "the benchmark task did not succeed:" >&2
    cat "$tmp/out" "$tmp/err" >&2
    exit 1
fi

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
max() { sort -n | tail -1; }

# Wall time in milliseconds: "median min".
wall_ms() { # command
    local cmd=$1
    if [[ ${BENCH_LOOP:-} != 1 ]] && command -v hyperfine >/dev/null; then
        hyperfine --shell=none --warmup 5 --runs "$RUNS" --style none \
            --export-csv "$tmp/h.csv" "$cmd" >/dev/null 2>&1
        # command,mean,stddev,median,user,system,min,max (seconds)
        awk -F, 'NR==2 {printf "%.3f %.3f\n", $4*1000, $7*1000}' "$tmp/h.csv"
    else
        local i t0 t1
        for ((i = 0; i < 5; i++)); do "$cmd" >/dev/null 2>&1; done
        for ((i = 0; i < RUNS; i++)); do
            t0=$(date +%s%N)
            "$cmd" >/dev/null 2>&1
            t1=$(date +%s%N)
            echo $(( t1 - t0 ))
        done > "$tmp/wall.all"
        printf '%s %s\n' "$(median < "$tmp/wall.all")" "$(sort -n "$tmp/wall.all" | head -1)" |
            awk '{printf "%.3f %.3f\n", $1/1e6, $2/1e6}'
    fi
}

# Peak RSS of each run, in KiB.
rss_kib() { # command
    local cmd=$1 i
    for ((i = 0; i < RUNS; i++)); do
        /usr/bin/time -f %M -o "$tmp/rss" "$cmd" >/dev/null 2>&1
        cat "$tmp/rss"
    done > "$tmp/rss.all"
    echo "$(median < "$tmp/rss.all") $(max < "$tmp/rss.all")"
}

tool=$([[ ${BENCH_LOOP:-} != 1 ]] && command -v hyperfine >/dev/null && echo "hyperfine $(hyperfine --version | awk '{print $2}')" || echo "date +%s%N loop")
load_before=$(cut -d' ' -f1 /proc/loadavg)
read -r true_ms true_min < <(wall_ms "$TRUE")
read -r worker_ms worker_min < <(wall_ms "$BIN")
read -r true_rss_med true_rss_max < <(rss_kib "$TRUE")
read -r worker_rss_med worker_rss_max < <(rss_kib "$BIN")

mib() { awk -v k="$1" 'BEGIN {printf "%.2f", k/1024}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1fx", (b > 0 ? a/b : 0)}'; }
verdict() { awk -v v="$1" -v t="$2" 'BEGIN {print (v <= t ? "met" : "MISSED")}'; }

echo "single-task start-up: echo task, no webhook, $RUNS runs, wall time by $tool"
echo "binary: $BIN ($(stat -c %s "$BIN") bytes), $(nproc) cores, 1-min load average $load_before"
echo "(other processes competing for the cores show up as medians near the 4 ms scheduler tick; compare min)"
printf '%-12s %14s %12s %18s %16s\n' "" "median wall" "min wall" "peak RSS median" "peak RSS max"
printf '%-12s %11s ms %9s ms %14s MiB %12s MiB\n' "/bin/true" "$true_ms" "$true_min" "$(mib "$true_rss_med")" "$(mib "$true_rss_max")"
printf '%-12s %11s ms %9s ms %14s MiB %12s MiB\n' "worker" "$worker_ms" "$worker_min" "$(mib "$worker_rss_med")" "$(mib "$worker_rss_max")"
printf '%-12s %14s %12s %18s %16s\n' "ratio" "$(ratio "$worker_ms" "$true_ms")" "$(ratio "$worker_min" "$true_min")" "$(ratio "$worker_rss_med" "$true_rss_med")" "$(ratio "$worker_rss_max" "$true_rss_max")"
echo "targets: median <= 5 ms: $(verdict "$worker_ms" 5); peak RSS <= 8 MiB: $(verdict "$(mib "$worker_rss_max")" 8)"
