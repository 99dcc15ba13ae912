"""The floor of a three-process path: redis-benchmark GET -c 1 through relays that do no work (issue 18).

The port-forward path crosses three processes (client, router, agent), so its round trip pays three
process wake-ups, reads and writes each way before any protocol work. This measures what three relays
that only copy bytes reach on this machine, interleaved round by round with one socat hop (the
issue's baseline) and with a direct connection:

- `socat x3`: three socat hops in a row;
- `uvloop x3`: three minimal Python relays in a row (bench/copy_relay.py's `MinimalRelay`: uvloop, `data_received` ->
  `transport.write`, plus the flow control and half-close a bulk client needs), the least any Python
  relay process does per message.

    .venv/bin/python -m bench.experiments.hop_floor [--rounds 4] [--requests 10000]
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack

from bench.bench_forward import socat_relay
from bench.bench_real_clients import redis_get, redis_server
from bench.copy_relay import relay_chain, uvloop_relay


def _relay_chain(stack: ExitStack, target: int, hops: int, python: bool) -> int:
    """`hops` relays in a row in front of `target` (socat, or MinimalRelay processes); the first's port."""
    return relay_chain(stack, target, hops, uvloop_relay if python else None)


def main() -> None:
    """Measure the paths round by round (order reversed every other round); print medians and ratios."""
    parser = argparse.ArgumentParser(prog="bench.experiments.hop_floor")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10000, help="GETs per run")
    args = parser.parse_args()
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        paths = {
            "direct": redis,
            "socat x1": stack.enter_context(socat_relay(redis)),
            "socat x3": _relay_chain(stack, redis, 3, python=False),
            "uvloop x3": _relay_chain(stack, redis, 3, python=True),
        }
        rps: dict[str, list[float]] = {name: [] for name in paths}
        for rnd in range(args.rounds):
            for name in list(paths) if rnd % 2 == 0 else reversed(list(paths)):
                rps[name].append(redis_get(paths[name], args.requests)[0])
        for name, runs in rps.items():
            ratios = [r / b for r, b in zip(runs, rps["socat x1"], strict=True)]
            print(f"{name:10} {statistics.median(runs):8.0f} GET/s  {statistics.median(ratios):.2f}x socat x1  {runs}")


if __name__ == "__main__":
    main()
