"""Run a Python function as a long-lived handler process for `worker`.

    python -m worker_runtime mypackage.handlers:resize

The function runs unchanged: it is called with the task's payload (and with
the whole task envelope as `task=` if it has a parameter of that name), and
what it returns is the task's result. A plain function runs in a thread pool
and an `async def` on the event loop, so one process serves many tasks at
once; an exception fails the task, to be retried unless the exception has a
true `permanent` attribute (raise `worker_runtime.PermanentError`, or set
`permanent = True` on your own exception class).

It speaks the worker's JSON-lines protocol (README, "Long-lived handlers"):
`{"ready": true}` once the function is imported, then one reply line per
request line. The reply stream is a private copy of stdout: `print()` and
anything else written to stdout go to stderr, which the worker logs.

Standard library only. `worker python-runtime` prints this file; a handlers
file entry with `function = "mypackage.handlers:resize"` runs it without a
copy.
"""

import asyncio
import concurrent.futures
import functools
import importlib
import inspect
import json
import os
import sys
import traceback

__all__ = ["PermanentError", "main"]

# The worker refuses longer replies; a result this large fails here, clearly.
MAX_REPLY_BYTES = 16 * 1024 * 1024
# Longest request line read (a task envelope is at most 16 MiB).
MAX_REQUEST_BYTES = 17 * 1024 * 1024


class PermanentError(Exception):
    """Raise it (or set `permanent = True` on an exception) when a retry cannot help."""

    permanent = True


def load(spec):
    """The callable named by `package.module:function` (attributes may be dotted)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"worker_runtime: {spec!r} is not package.module:function")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise SystemExit(f"worker_runtime: {spec} is not callable")
    return target


def is_async(func):
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)
    )


def takes_task(func):
    try:
        return "task" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


class Runtime:
    def __init__(self, func, reply_fd):
        self.func = func
        self.is_async = is_async(func)
        self.takes_task = takes_task(func)
        self.reply_fd = reply_fd
        self.threads = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="handler")

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.reply_fd, view):]

    def reply(self, request_id, **fields):
        try:
            text = json.dumps({"id": request_id, **fields}, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            text = json.dumps(
                {"id": request_id, "error": f"the result is not JSON: {e}", "permanent": True}
            )
        data = text.encode() + b"\n"
        if len(data) > MAX_REPLY_BYTES:
            data = json.dumps(
                {
                    "id": request_id,
                    "error": f"the result is {len(data)} bytes of JSON, above the "
                    f"{MAX_REPLY_BYTES} byte limit",
                    "permanent": True,
                }
            ).encode() + b"\n"
        self.write(data)

    async def call(self, payload, task):
        kwargs = {"task": task} if self.takes_task else {}
        if self.is_async:
            result = await self.func(payload, **kwargs)
        else:
            loop = asyncio.get_running_loop()
            call = functools.partial(self.func, payload, **kwargs)
            result = await loop.run_in_executor(self.threads, call)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def handle(self, line):
        try:
            request = json.loads(line)
            request_id, task = request["id"], request["task"]
        except (ValueError, KeyError, TypeError) as e:
            print(f"worker_runtime: ignoring a request that is not valid: {e}", file=sys.stderr)
            return
        try:
            result = await self.call(task.get("payload"), task)
        except Exception as e:  # noqa: BLE001 - every failure is the task's
            traceback.print_exc(file=sys.stderr)
            self.reply(
                request_id,
                error=f"{type(e).__name__}: {e}",
                permanent=bool(getattr(e, "permanent", False)),
            )
            return
        self.reply(request_id, result=result)

    async def serve(self):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_REQUEST_BYTES)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self.write(b'{"ready":true}\n')
        running = set()
        while True:
            line = await reader.readline()
            if not line:
                break
            task = asyncio.create_task(self.handle(line))
            running.add(task)
            task.add_done_callback(running.discard)
        # Stdin closed: the worker takes no more replies after the running tasks.
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        self.threads.shutdown(wait=False, cancel_futures=True)


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m worker_runtime package.module:function", file=sys.stderr)
        raise SystemExit(2)
    # Replies go to a private copy of stdout; fd 1 and sys.stdout become
    # stderr, so a handler's print() cannot break a reply line.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    func = load(args[0])
    asyncio.run(Runtime(func, reply_fd).serve())


if __name__ == "__main__":
    main()
