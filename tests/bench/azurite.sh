# Sourced by the benchmark scripts: starts an in-memory Azurite (queue and
# blob services; the outbox keeps outcomes too large for a queue message as
# blobs) on free loopback ports. Needs ROOT (the repository) and WORK (a temp
# dir); sets AZ_PID and PORT (the queue service's) and exports
# AZURE_STORAGE_CONNECTION_STRING. The caller's EXIT trap stops AZ_PID.
# shellcheck shell=bash disable=SC2034  # AZ_PID is the caller's

start_azurite() {
    local az_bin=$ROOT/tests/node_modules/.bin/azurite
    if [ ! -x "$az_bin" ]; then
        (cd "$ROOT/tests" && npm ci --no-audit --no-fund --loglevel=error)
    fi
    : >"$WORK/azurite.log"
    "$az_bin" --queueHost 127.0.0.1 --queuePort 0 --blobHost 127.0.0.1 --blobPort 0 \
        --tableHost 127.0.0.1 --tablePort 0 --inMemoryPersistence --silent \
        --disableTelemetry >"$WORK/azurite.log" 2>&1 &
    AZ_PID=$!
    PORT=
    local blob_port=
    for _ in $(seq 1 300); do
        PORT=$(sed -n 's/.*Queue service is successfully listening at http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/azurite.log" | head -1)
        blob_port=$(sed -n 's/.*Blob service is successfully listening at http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/azurite.log" | head -1)
        [ -n "$PORT" ] && [ -n "$blob_port" ] && break
        sleep 0.2
    done
    [ -n "$PORT" ] && [ -n "$blob_port" ] || { echo "Azurite did not start:" >&2; cat "$WORK/azurite.log" >&2; exit 1; }
    export AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;QueueEndpoint=http://127.0.0.1:$PORT/devstoreaccount1;BlobEndpoint=http://127.0.0.1:$blob_port/devstoreaccount1"
}
