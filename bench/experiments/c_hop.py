"""What a data path in C would buy redis GET -c 1 through port-forward (issue 18): an upper bound, measured.

The sixteenth session's turn times (hop_timeline) put 26-27 us of each process's turn before the write
that wakes the next, against a minimal relay's 9, and estimated that a C front in the router and in both
edges' HTTP/2-to-socket direction would take the forward to about 0.37x of a socat hop. This measures
it. Stack B's processes get `cfront.c` (built here with the system's C compiler) as every HTTP/2
connection's get_buffer / buffer_updated: a read that is one whole small DATA frame of a stream with a
lane is passed on in C (the router: a new frame header and one `transport.write`; an edge: the payload
sent to the forwarded socket), with no Python frame run before the write. Stack A is the same tree
unchanged, and both run without the project's own native front (h2/front.py, which this experiment
measured the case for). Both run `forward_ab`'s interleaved rounds against a socat hop.

Lanes are taken the way bare_router_hop takes them, after Python delivered a stream's frame itself:
the router's for a paired stream whose relay waits; an edge's for a stream whose frames go straight
to a forwarded socket (a DirectSender). A measuring device, unfit to serve: like bare_router_hop it
keeps no window, budget, count or resume acknowledgement for what C passes, only a WINDOW_UPDATE per
8 KiB back.

    .venv/bin/python -m bench.experiments.c_hop [--where router|edges|all] [--redis] [--repeats 6]
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import statistics
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.experiments.forward_ab import measure

SOURCE = Path(__file__).with_name("cfront") / "cfront.c"
SITECUSTOMIZE = "from bench.experiments.c_hop import install\ninstall({where!r})\n"


def build(into: Path) -> Path:
    """Compile cfront.c into `into` as the _cfront extension module; its path."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = into / f"_cfront{suffix}"
    include = sysconfig.get_paths()["include"]
    cmd = ["cc", "-O2", "-shared", "-fPIC", "-Wall", f"-I{include}", str(SOURCE), "-o", str(target)]
    subprocess.run(cmd, check=True)
    return target


def _edge_lane(stream: Any) -> tuple[int, int, Any] | None:
    """(1, fd, sender) when `stream`'s data frames go straight to a forwarded socket, else None."""
    listener = getattr(stream, "_listener", None)
    if not isinstance(listener, functools.partial) or len(listener.args) != 2:
        return None
    data = listener.args[1]
    resumable = getattr(getattr(data, "func", None), "__self__", None)
    sink = getattr(resumable, "_data_sink", None)
    sender = getattr(sink, "__self__", None)
    if type(sender).__name__ != "DirectSender" or not getattr(resumable, "_handler_waiting", False):
        return None
    return (1, sender.sock.fileno(), sender)


def _router_lane(stream: Any) -> tuple[int, Any, int] | None:
    """(0, out_conn, out_stream_id) when `stream` is a paired stream whose relay waits, else None."""
    passing = getattr(getattr(stream, "_passthrough", None), "__self__", None)
    if type(passing).__name__ != "_Passing" or not passing.idle:
        return None
    framed = passing.queue._sink.framed
    if framed is None:
        return None
    return (0, framed.__self__.conn, framed.__self__.id)


def install(where: str) -> None:
    """Put a C front on every HTTP/2 connection of this process and take lanes as they come (B's, at start)."""
    import sys

    sys.path.insert(0, os.environ["OSMO_CFRONT_DIR"])
    from _cfront import Front  # type: ignore[import-not-found]

    from osmo_router.h2.connection import Connection

    is_router = "serve" in sys.orig_argv  # (`osmo-router serve`; the agent is `agent`, the client `-c ...`)
    if where != "all" and (where == "router") != is_router:
        return
    take_lane = _router_lane if is_router else _edge_lane
    original_init, original_data_frame = Connection.__init__, Connection.data_frame
    fronts: list[Any] = []

    def report() -> None:  # (how many frames C passed: proof the front was in the path)
        passed = sum(front.counts()[0] for front in fronts)
        fed = sum(front.counts()[1] for front in fronts)
        with open(Path(os.environ["OSMO_CFRONT_DIR"]) / f"counts-{os.getpid()}", "w") as out:
            out.write(f"{sys.orig_argv[2:4]} passed={passed} fed={fed}\n")

    atexit.register(report)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        front = self._cfront = Front(self, self._reader)
        fronts.append(front)
        self.get_buffer, self.buffer_updated = front.get_buffer, front.buffer_updated

    def data_frame(self: Any, stream_id: int, flags: int, payload: memoryview, last: bool, flow: int = -1) -> None:
        original_data_frame(self, stream_id, flags, payload, last, flow)
        lanes = self._cfront.lanes
        if stream_id not in lanes:
            lane = take_lane(self.streams.get(stream_id))
            if lane is not None:
                lanes[stream_id] = lane

    Connection.__init__ = init  # type: ignore[method-assign]
    Connection.data_frame = data_frame  # type: ignore[method-assign]


def main() -> None:
    """Measure stack A (unchanged) against B (C fronts), interleaved; print medians and ratios."""
    parser = argparse.ArgumentParser(prog="bench.experiments.c_hop", description=__doc__)
    parser.add_argument("--where", choices=("router", "edges", "all"), default="all")
    parser.add_argument("--redis", action="store_true", help="redis-benchmark GET -c 1 instead of the ping-pong")
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="c-hop-") as tmp:
        build(Path(tmp))
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE.format(where=args.where))
        # (both without the project's own native front, h2/front.py: A is the Python path, B this bare one)
        python_path = {"OSMO_NATIVE_FRONT": "0"}
        b_env = {**python_path, "PYTHONPATH": f"{tmp}:{ROOT}:{ROOT / 'src'}", "OSMO_CFRONT_DIR": tmp}
        result = measure({"A": python_path, "B": b_env}, args.rounds, args.repeats, args.redis)
        for counts in sorted(Path(tmp).glob("counts-*")):
            print("B's C fronts:", counts.read_text().strip())
    for name, runs in result["runs"].items():
        print(name, {key: round(statistics.median(run[key] for run in runs)) for key in runs[0]})
    key = "rps" if args.redis else "p50"
    ratios = [b[key] / a[key] for a, b in zip(result["runs"]["A"], result["runs"]["B"], strict=True)]
    socat = result[f"socat_{key}"]
    print(f"socat {key} {socat:.0f}; B/A {key} per round {[round(r, 3) for r in ratios]}")
    if args.redis:
        for name, runs in result["runs"].items():
            print(f"{name} / socat: {statistics.median(run['rps'] for run in runs) / socat:.3f}")


if __name__ == "__main__":
    main()
