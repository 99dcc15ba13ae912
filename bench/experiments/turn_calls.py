"""The Python calls each forward process makes per message, in order, under a steady redis GET -c 1 (issue 18).

Starts a forward stack whose processes load a `sitecustomize` (written to a temporary directory first on
their PYTHONPATH) that waits for SIGUSR2 and then records, with `sys.setprofile`, the next `--events`
Python and C calls of the main thread, one per line, to `<out>/calls-<pid>.txt` (printed per role). A steady
redis-benchmark runs through the forward meanwhile; the signal comes once it is warm. Read a file from
one `get_buffer` to the next for one message's turn (bench/experiments/hop_timeline.py times the turns).

    .venv/bin/python -m bench.experiments.turn_calls [--out /tmp/turn-calls] [--events 3000]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.bench_real_clients import redis_server
from bench.common import ROOT
from bench.experiments.forward_ab import forward_stack

#: Installed in each process of the stack; OSMO_TURN_CALLS names the file, OSMO_TURN_EVENTS the count.
SITECUSTOMIZE = """
import os, signal, sys

_events = []
_limit = int(os.environ["OSMO_TURN_EVENTS"])


def _record(frame, event, arg):
    if event == "call":
        code = frame.f_code
        _events.append(f"{code.co_filename.rsplit('/src/', 1)[-1]}:{code.co_firstlineno}:{code.co_name}")
    elif event == "c_call":
        _events.append(f"    C {getattr(arg, '__qualname__', arg)}")
    if len(_events) >= _limit:
        sys.setprofile(None)
        path = os.environ["OSMO_TURN_CALLS"].replace("PID", str(os.getpid()))
        with open(path, "w") as out:
            out.write("\\n".join(_events) + "\\n")


signal.signal(signal.SIGUSR2, lambda *_: sys.setprofile(_record))
"""


def main() -> None:
    """Record each process's calls once the GETs are steady; print where the files are."""
    parser = argparse.ArgumentParser(prog="bench.experiments.turn_calls", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("/tmp/turn-calls"))
    parser.add_argument("--events", type=int, default=3000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="turn-calls-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {
            "PYTHONPATH": f"{tmp}:{ROOT / 'src'}",
            "OSMO_TURN_EVENTS": str(args.events),
            "OSMO_TURN_CALLS": str(args.out / "calls-PID.txt"),
        }
        target = stack.enter_context(redis_server())
        port, pids = forward_stack(stack, env, target, "turn-calls")
        argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-n", "100000000", "-t", "get"]
        bench = subprocess.Popen([*argv, "-q"], stdout=subprocess.DEVNULL)
        stack.callback(bench.wait, 10)
        stack.callback(bench.terminate)
        time.sleep(1.5)  # (warm: the turns traced are the steady state's)
        for pid in pids.values():
            os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        files = {role: args.out / f"calls-{pid}.txt" for role, pid in pids.items()}
        while not all(path.exists() for path in files.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
    for role, path in files.items():
        print(f"{role}: {path}" if path.exists() else f"{role}: nothing recorded (is it still running?)")


if __name__ == "__main__":
    main()
