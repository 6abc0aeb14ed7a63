# Sourced by the benchmark scripts: starts an in-memory Azurite (queue
# service) on a free loopback port. Needs ROOT (the repository) and WORK (a
# temp dir); sets AZ_PID and PORT and exports AZURE_STORAGE_CONNECTION_STRING.
# The caller's EXIT trap stops AZ_PID.
# shellcheck shell=bash disable=SC2034  # AZ_PID is the caller's

start_azurite() {
    local az_bin=$ROOT/tests/node_modules/.bin/azurite-queue
    if [ ! -x "$az_bin" ]; then
        (cd "$ROOT/tests" && npm ci --no-audit --no-fund --loglevel=error)
    fi
    : >"$WORK/azurite.log"
    "$az_bin" --queueHost 127.0.0.1 --queuePort 0 --inMemoryPersistence --silent \
        --disableTelemetry >"$WORK/azurite.log" 2>&1 &
    AZ_PID=$!
    PORT=
    for _ in $(seq 1 300); do
        PORT=$(sed -n 's/.*successfully listens on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/azurite.log" | head -1)
        [ -n "$PORT" ] && break
        sleep 0.2
    done
    [ -n "$PORT" ] || { echo "Azurite did not start:" >&2; cat "$WORK/azurite.log" >&2; exit 1; }
    export AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;QueueEndpoint=http://127.0.0.1:$PORT/devstoreaccount1"
}
