"""How much of redis GET -c 1 through port-forward is the router's relay logic (issue 18)? An upper bound.

Stack B's router relays a whole small DATA frame of a paired stream with the least Python a relay hop
can have: one dictionary lookup, the new frame header, one `transport.write`, and a WINDOW_UPDATE back
per 8 KiB. No stream or connection window, byte budget, session count, watchdog or BDP sample is kept
for it: what a data path in C would cost the router's Python, at best. Stack A is the same tree
unchanged. Both run `forward_ab`'s interleaved redis-benchmark rounds (or its ping-pong without
`--redis`) against a socat hop.

It is installed in B's processes by a `sitecustomize` module written to a temporary directory first
on their PYTHONPATH (only the router has relayed streams; the ends' connections are untouched). It is a
measuring device, unfit to serve: it ignores the peer's windows and the order of a message the
reader task still holds.

    .venv/bin/python -m bench.experiments.bare_router_hop [--redis] [--rounds 5000] [--repeats 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.experiments.forward_ab import measure

GRANT_EVERY = 8192
SITECUSTOMIZE = "from bench.experiments.bare_router_hop import install\ninstall()\n"


def install() -> None:
    """Replace Connection.data_frame by the bare hop in front of it (in B's processes, at start)."""
    from osmo_router.h2 import frames as fr
    from osmo_router.h2.connection import Connection

    original = Connection.data_frame
    lanes: dict[tuple[int, int], tuple[Any, int, list[int]]] = {}

    def data_frame(self: Any, stream_id: int, flags: int, payload: memoryview, last: bool, flow: int = -1) -> None:
        lane = lanes.get((id(self), stream_id))
        if lane is not None and last and not flags:
            out, out_id, unacked = lane
            head = fr.HEADER.pack(len(payload) << 8 | fr.DATA, 0, out_id)
            if out._deferred:  # (window updates due to the peer ride on the next write, as in send_now)
                head, out._deferred = out._deferred + head, b""
            out.transport.write(head + payload)
            out._timers.strikes = 0  # data sent: the peer's keepalive pings are not abuse
            unacked[0] += len(payload)
            if unacked[0] >= GRANT_EVERY:
                grant = unacked[0].to_bytes(4, "big")
                unacked[0] = 0
                self.write_frame(
                    fr.encode(fr.WINDOW_UPDATE, 0, 0, grant) + fr.encode(fr.WINDOW_UPDATE, 0, stream_id, grant)
                )
            return
        original(self, stream_id, flags, payload, last, flow)
        stream = self.streams.get(stream_id)
        passing = getattr(getattr(stream, "_passthrough", None), "__self__", None)
        if (id(self), stream_id) not in lanes and type(passing).__name__ == "_Passing" and passing.idle:
            framed = passing.queue._sink.framed
            if framed is not None:  # the relay is up and its reader waits: the stream's next frames take the lane
                lanes[(id(self), stream_id)] = (framed.__self__.conn, framed.__self__.id, [0])

    Connection.data_frame = data_frame  # type: ignore[method-assign]


def main() -> None:
    """Measure stack A (unchanged) against B (the bare hop), interleaved; print medians and ratios."""
    parser = argparse.ArgumentParser(prog="bench.experiments.bare_router_hop", description=__doc__)
    parser.add_argument("--redis", action="store_true", help="redis-benchmark GET -c 1 instead of the ping-pong")
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bare-hop-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        envs = {"A": {}, "B": {"PYTHONPATH": f"{tmp}:{ROOT}:{ROOT / 'src'}"}}
        result = measure(envs, args.rounds, args.repeats, args.redis)
    for name, runs in result["runs"].items():
        print(name, {key: round(statistics.median(run[key] for run in runs)) for key in runs[0]})
    key = "rps" if args.redis else "p50"
    ratios = [b[key] / a[key] for a, b in zip(result["runs"]["A"], result["runs"]["B"], strict=True)]
    print(f"socat {key} {result[f'socat_{key}']:.0f}; B/A {key} per round {[round(r, 3) for r in ratios]}")


if __name__ == "__main__":
    main()
