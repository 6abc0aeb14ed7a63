"""A Python asyncio queue worker on the official SDK, calling the handler
in-process: what teams run today, and what tests/bench/persistent.sh
compares the worker with.

    python sdk_worker.py QUEUE module:function

Receives up to 32 messages at a time (never more than free slots), runs at
most CONCURRENCY at once (a plain function in the default thread pool, an
`async def` on the loop), deletes each message after its handler returned,
and exits once a receive comes back empty with nothing running. Prints the
number of tasks done.
"""

import asyncio
import importlib
import inspect
import json
import os
import sys

from azure.storage.queue.aio import QueueClient


async def main(queue_name, spec):
    module, _, name = spec.partition(":")
    func = getattr(importlib.import_module(module), name)
    is_async = inspect.iscoroutinefunction(func)
    concurrency = int(os.environ.get("CONCURRENCY", "8"))
    loop = asyncio.get_running_loop()
    done = 0

    # The SDK speaks a newer service version than the pinned Azurite knows;
    # the calls used here are the same in both.
    async with QueueClient.from_connection_string(
        os.environ["AZURE_STORAGE_CONNECTION_STRING"],
        queue_name,
        api_version=os.environ.get("QUEUE_API_VERSION", "2026-06-06"),
    ) as queue:

        async def handle(message):
            nonlocal done
            payload = json.loads(message.content).get("payload")
            if is_async:
                await func(payload)
            else:
                await loop.run_in_executor(None, func, payload)
            await queue.delete_message(message)
            done += 1

        running = set()
        while True:
            free = concurrency - len(running)
            if free == 0:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            n = min(32, free)
            messages = [
                m
                async for m in queue.receive_messages(
                    messages_per_page=n, max_messages=n, visibility_timeout=60
                )
            ]
            if not messages:
                if not running:
                    break
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            for m in messages:
                task = asyncio.create_task(handle(m))
                running.add(task)
                task.add_done_callback(running.discard)
    print(done)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
