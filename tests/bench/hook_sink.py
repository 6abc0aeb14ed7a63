#!/usr/bin/env python3
"""Webhook receivers for tests/bench/webhook.sh (Python 3 standard library only).

Default mode: the receiver a backend team writes in a few lines, and nothing
more: `http.server.ThreadingHTTPServer` with its defaults (a thread per
connection, the listen queue at its default `request_queue_size` of 5) and a
`BaseHTTPRequestHandler` with its default protocol, HTTP/1.0, so every answer
closes its connection. A POST is answered 200 at once; `POST /<run>?delay_ms=D`
answers after D milliseconds instead (a slow but healthy backend: each request
sleeps on its own thread, so there are as many in flight as connections).

Each distinct webhook-id is recorded once per run, before the answer, as a line
in <--log-dir>/<run>.log (flushed at once):

    <webhook-id> <recorded_ns>

with the time from the wall clock (nanoseconds since the epoch, the clock of
`date +%s%N`), taken under the lock so that the lines are in time order.

`--werkzeug`: the same app served the way Flask's development server (werkzeug)
serves a threaded app, which is what `flask run` and `app.run()` give a small
backend: a listen queue of 128 (werkzeug's LISTEN_QUEUE) and HTTP/1.1, so a
connection stays open for the next request (keep-alive).

`--blackhole`: a host that never answers: it listens (a large backlog, so the
kernel completes the handshakes) but never accepts a connection or reads a
byte; every request to it times out.

The port (bound to --host, --port; default 127.0.0.1 and 0, any free port) is
written to --port-file once the socket listens.
"""

import argparse
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Receiver(ThreadingHTTPServer):
    def __init__(self, addr, log_dir, handler):
        super().__init__(addr, handler)
        self.log_dir = log_dir
        self.lock = threading.Lock()
        self.seen = {}  # run -> set of webhook-ids
        self.logs = {}  # run -> open file

    def record(self, run, webhook_id):
        with self.lock:
            seen = self.seen.setdefault(run, set())
            if webhook_id in seen:
                return
            seen.add(webhook_id)
            log = self.logs.get(run)
            if log is None:
                log = open(os.path.join(self.log_dir, run + ".log"), "a", encoding="utf-8")
                self.logs[run] = log
            log.write(f"{webhook_id} {time.time_ns()}\n")
            log.flush()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        url = urlsplit(self.path)
        run = re.sub(r"[^A-Za-z0-9_-]", "_", url.path.strip("/")) or "-"
        values = parse_qs(url.query).get("delay_ms")
        delay_ms = float(values[0]) if values else 0.0
        webhook_id = re.sub(r"\s", "_", self.headers.get("webhook-id") or "-")
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)
        self.server.record(run, webhook_id)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass  # the recorded ids are the log


class WerkzeugReceiver(Receiver):
    request_queue_size = 128  # read by server_activate(), in __init__


class KeepAliveHandler(Handler):
    protocol_version = "HTTP/1.1"


def write_port(port_file, port):
    # Written whole, then renamed, so a reader never sees half a number.
    tmp = port_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{port}\n")
    os.replace(tmp, port_file)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", required=True)
    p.add_argument("--log-dir")
    p.add_argument("--werkzeug", action="store_true")
    p.add_argument("--blackhole", action="store_true")
    args = p.parse_args()
    if args.blackhole:
        sock = socket.create_server((args.host, args.port), backlog=4096)
        write_port(args.port_file, sock.getsockname()[1])
        while True:
            time.sleep(3600)
    if not args.log_dir:
        p.error("--log-dir is needed unless --blackhole")
    if args.werkzeug:
        server = WerkzeugReceiver((args.host, args.port), args.log_dir, KeepAliveHandler)
    else:
        server = Receiver((args.host, args.port), args.log_dir, Handler)
    write_port(args.port_file, server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
