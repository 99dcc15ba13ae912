"""Merging the data frames that are already queued for one stream into one message.

A message carrying a pure data frame is `0x12 varint(len) 0x0a varint(len) payload` on every
stream (see framecodec.py), so merging needs no protobuf objects.

A writer that finds several small data frames waiting behind the one it is about to send merges
them (up to COALESCE_LIMIT payload bytes) so the burst costs one gRPC write instead of one each.
It takes frames only from the front of the queue and stops at the first one that is not a pure
data frame, so data never moves past a control frame (half-close, exit status, error, ...).
"""

from __future__ import annotations

from typing import Final

from osmo_router.router.core.flow_control import FlowQueue
from osmo_router.wire.codec import merge_data_messages, payload_offset

#: Largest payload a merged message carries: big enough to amortise the per-message cost of gRPC,
#: small enough to stay far below any max message size and keep latency flat.
COALESCE_LIMIT: Final = 128 * 1024


def coalesce(first: bytes, queue: FlowQueue, limit: int = COALESCE_LIMIT) -> bytes:
    """`first`, or `first` merged with the data frames queued right behind it (taken off the queue)."""
    if len(first) >= limit or (following := queue.peek()) is None:
        return first
    offset = payload_offset(first)
    if offset < 0:
        return first
    messages = [first]
    offsets = [offset]
    size = len(first) - offset
    while following is not None:
        offset = payload_offset(following)
        if offset < 0 or size + len(following) - offset > limit:
            break
        messages.append(queue.pop())
        offsets.append(offset)
        size += len(following) - offset
        following = queue.peek()
    return first if len(messages) == 1 else merge_data_messages(messages, offsets)
