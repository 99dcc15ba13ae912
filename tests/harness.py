"""Real processes for end-to-end tests: a router, agents and clients on loopback.

Every wait is bounded; readiness is awaited from the processes' own structured log lines
(`event: listening`, `event: registered`), never guessed with sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
WAIT = 30.0


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for spawned CLIs: JSON logs, no proxies, the repo's src importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSMO_") and "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(ROOT / "src")
    env["PYTHONUNBUFFERED"] = "1"
    # TEST_GRPC_CHANNEL=native runs every spawned client and agent on the h2 channel (issue 18).
    if os.environ.get("TEST_GRPC_CHANNEL"):
        env["OSMO_GRPC_CHANNEL"] = os.environ["TEST_GRPC_CHANNEL"]
    # TEST_NATIVE_FRONT=0 runs every spawned client and agent without the native front (h2/front.py).
    if os.environ.get("TEST_NATIVE_FRONT"):
        env["OSMO_NATIVE_FRONT"] = os.environ["TEST_NATIVE_FRONT"]
    env.update(extra or {})
    return env


def router_cmd(*args: str) -> list[str]:
    """argv of `osmo-router ARGS`."""
    return [PYTHON, "-m", "osmo_router", *args]


def client_cmd(*args: str) -> list[str]:
    """argv of `osmo-net-client ARGS`."""
    return [PYTHON, "-c", "from osmo_router.client.cli import main; main()", *args]


class Proc:
    """A child process whose stderr is collected line by line (stdout too unless it is passed through)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdin: Any = subprocess.DEVNULL,
        capture_stdout: bool = True,
        **kwargs: Any,
    ) -> None:
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE if capture_stdout else None,
            stderr=subprocess.PIPE,
            env=env or cli_env(),
            start_new_session=True,
            **kwargs,
        )
        self.lines: list[str] = []
        self.out_lines: list[str] = []
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._drain, args=(self.popen.stderr, self.lines), daemon=True)]
        if capture_stdout:
            self._threads.append(
                threading.Thread(target=self._drain, args=(self.popen.stdout, self.out_lines), daemon=True)
            )
        for t in self._threads:
            t.start()

    def _drain(self, pipe: Any, sink: list[str]) -> None:
        for raw in iter(pipe.readline, b""):
            with self._cond:
                sink.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def events(self) -> list[dict[str, Any]]:
        """The JSON log records printed so far."""
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT, stdout: bool = False
    ) -> dict[str, Any]:
        """The first JSON log record (or stdout line, as {"line": ...}) matching predicate."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                records = [{"line": line} for line in self.out_lines] if stdout else self.events()
                for record in records:
                    if predicate(record):
                        return record
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AssertionError(
                        f"{self.argv[2:5]} never logged the awaited record; stderr:\n" + "\n".join(self.lines[-30:])
                    )
                self._cond.wait(min(left, 0.5))

    def wait_event(self, event: str, timeout: float = WAIT) -> dict[str, Any]:
        """The first log record with `event` set to this value."""
        return self.wait_for(lambda r: r.get("event") == event, timeout)

    def wait_exit(self, timeout: float = WAIT) -> int:
        """The exit code, waiting at most `timeout` seconds."""
        code = self.popen.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def signal(self, sig: int) -> None:
        """Send a signal to the process."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self) -> None:
        """Terminate (then kill) the process and its group."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


class Router(Proc):
    """`osmo-router serve` on a free loopback port, plaintext and unauthenticated unless told otherwise."""

    def __init__(self, *args: str, secure: bool = False, env: dict[str, str] | None = None) -> None:
        base = ["serve", "--host", "127.0.0.1", "--metrics-port", "0", "--log-format", "json"]
        if "--port" not in args:
            base += ["--port", "0"]
        if "--ws-port" not in args:
            base += ["--ws-port", "0"]
        if not secure:
            base += ["--tls-enabled=false", "--auth=none"]
        super().__init__(router_cmd(*base, *args), env=cli_env(env))
        record = self.wait_event("listening")
        self.port: int = record["grpc_port"]
        self.metrics_port: int = record["metrics_port"]
        self.ws_port: int = record.get("ws_port", -1)
        self.router_id: str = record["router_id"]
        self.address = f"127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        """The /metrics page."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return str(resp.read().decode())


class AgentProc(Proc):
    """`osmo-router agent` registered for a workflow (waits for the registration); `launcher`, a
    command that execs its arguments, runs it (a shell setting up what the agent inherits, say)."""

    def __init__(
        self,
        router_address: str,
        workflow: str,
        *args: str,
        tls: bool = False,
        wait: bool = True,
        env: dict[str, str] | None = None,
        launcher: Sequence[str] = (),
    ) -> None:
        argv = router_cmd(
            "agent",
            "--router-address",
            router_address,
            "--workflow-id",
            workflow,
            "--log-format",
            "json",
            *([] if tls else ["--tls=false"]),
            *args,
        )
        super().__init__([*launcher, *argv], env=cli_env(env))
        if wait:
            self.wait_event("registered")


def run_client(
    *args: str, input: bytes | None = None, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `osmo-net-client ARGS` to completion."""
    return subprocess.run(
        client_cmd(*args),
        input=input,
        capture_output=True,
        timeout=timeout,
        env=cli_env(env),
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def exec_served(*args: str, timeout: float = 60.0) -> None:
    """Assert that `osmo-net-client exec ARGS -- echo served` runs and exits 0 (a hostile test's bystander)."""
    result = run_client("exec", *args, "--", "echo", "served", timeout=timeout)
    assert (result.returncode, result.stdout) == (0, b"served\n"), result.stderr.decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in Prometheus exposition text (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0
