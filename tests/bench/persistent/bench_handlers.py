"""The handler module of tests/bench/persistent.sh, the same for every side:
a team's handler imports its libraries (here `requests`) and does a little
work per task (here it hashes its payload)."""

import asyncio
import hashlib
import json

try:
    import requests  # noqa: F401 - the import is the point: its cost per process
except ImportError:
    requests = None


def hash_payload(payload):
    """CPU-light, like most handlers that call a service: hash the payload."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest}


async def wait_io(payload):
    """I/O-bound: awaits 200 ms, as a call to a slow API would."""
    await asyncio.sleep(0.2)
    return hash_payload(payload)
