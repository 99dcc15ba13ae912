"""A hostile client in a process of its own: exec sessions that push maximum-size frames at a command
that never reads its stdin, until the router stops taking them.

    python -m tests.stall_attacker ADDRESS WORKFLOW TOKEN SESSIONS FRAME_BYTES SECONDS

Prints one JSON line per second, `{"sent": [bytes per session], "open": n}`, and runs until killed.
Every session writes as fast as gRPC lets it: once the router's queues, the user's budget and gRPC's
windows are full, each write waits for ever (the router's backpressure), which is the attack.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc

from tests.raw_grpc import EXEC, RawCall, exec_init, frame


async def _push(call: RawCall, payload: bytes, sent: list[int], index: int) -> None:
    message = frame(data=payload)
    while await call.send(message):
        sent[index] += len(message)


async def main(address: str, workflow: str, token: str, sessions: int, frame_bytes: int, seconds: str) -> None:
    """Open the sessions and push until killed."""
    channel = grpc.aio.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)],
    )
    payload = bytes(frame_bytes - 16)  # the frame's own encoding adds a few bytes
    sent = [0] * sessions
    tasks = []
    for index in range(sessions):
        call = RawCall(channel, EXEC, token)
        await call.send(exec_init(workflow, ["sleep", seconds]))  # sleep never reads its stdin
        tasks.append(asyncio.create_task(_push(call, payload, sent, index)))
    while True:
        print(json.dumps({"sent": sent, "open": sum(not t.done() for t in tasks)}), flush=True)
        await asyncio.sleep(1)


if __name__ == "__main__":
    address, workflow, token, count, size, seconds = sys.argv[1:7]
    asyncio.run(main(address, workflow, token, int(count), int(size), seconds))
