#!/usr/bin/env python3
"""Webhook sink for tests/bench/webhook.sh (Python 3 standard library only).

Answers every POST with 200 after a delay, so that a benchmark can stand in for
a slow backend: `POST /<run>?delay_ms=D` sleeps D milliseconds (default: the
--delay-ms option) before answering. Each request is handled on its own thread,
so hundreds of slow requests are in flight at once; HTTP/1.1 keep-alive.

For each answered request one line goes to --log (flushed at once):

    <run> <webhook-id> <received_ns> <answered_ns> <in_flight>

with times from the wall clock (nanoseconds since the epoch, the clock of
`date +%s%N`) and the number of requests in flight when it was received.

`GET /` answers `ok` (readiness). The port (bound to --port, default 0: any
free port) is written to --port-file once the server listens.
"""

import argparse
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Sink(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr, log, default_delay_ms):
        super().__init__(addr, Handler)
        self.log = log
        self.default_delay_ms = default_delay_ms
        self.lock = threading.Lock()
        self.in_flight = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer(200, b"ok\n")

    def do_POST(self):
        received = time.time_ns()
        server = self.server
        with server.lock:
            server.in_flight += 1
            in_flight = server.in_flight
        try:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            url = urlsplit(self.path)
            run = url.path.strip("/").replace(" ", "_") or "-"
            delay_ms = server.default_delay_ms
            values = parse_qs(url.query).get("delay_ms")
            if values:
                delay_ms = float(values[0])
            webhook_id = (self.headers.get("webhook-id") or "-").replace(" ", "_")
            if delay_ms > 0:
                time.sleep(delay_ms / 1000)
            self._answer(200)
            answered = time.time_ns()
            with server.lock:
                server.log.write(f"{run} {webhook_id} {received} {answered} {in_flight}\n")
                server.log.flush()
        finally:
            with server.lock:
                server.in_flight -= 1

    def log_message(self, *args):
        pass  # one line per request goes to --log instead


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    args = p.parse_args()
    with open(args.log, "a", encoding="utf-8") as log:
        server = Sink(("127.0.0.1", args.port), log, args.delay_ms)
        # Written whole, then renamed, so a reader never sees half a number.
        tmp = args.port_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{server.server_address[1]}\n")
        os.replace(tmp, args.port_file)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
