"""Security end to end: real certificates, real signed tokens, real router/agent/client processes.

One TLS+JWT router serves the module; every refusal is followed, at the end, by a good session on
the same router, which proves the hostile attempts harmed nothing.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.harness import AgentProc, Router, cli_env, metric_value, router_cmd, run_client
from tests.raw_grpc import EXEC, REGISTER, Outcome, RawCall, exchange, exec_init, hello
from tests.security_kit import JwksServer, Pki, Signer

WF = "wf-secure"
OTHER_WF = "wf-somebody-else"


@dataclass
class Setup:
    """The module's PKI, token issuers, router and agent."""

    pki: Pki
    rsa: Signer
    ec: Signer
    router: Router
    agent: AgentProc

    def client(self, *args: str, token: str | None = "", ca: Path | None = None, tls: bool = True) -> list[str]:
        """Client flags for the secure router (token "" means a valid user token for WF)."""
        flags = ["--router-address", self.router.address, "--workflow-id", WF]
        if tls:
            flags += ["--tls-ca", str(ca or self.pki.ca)]
        else:
            flags += ["--tls=false"]
        if token is not None:
            flags += ["--token", token or self.rsa.token("alice", workflows=[WF])]
        return [*flags, *args]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("pki")
    pki = Pki.create(directory)
    rsa, ec = Signer.rs256(), Signer.es256()
    key_file = directory / "jwt-rsa.pub.pem"
    key_file.write_bytes(rsa.public_pem())
    jwks = JwksServer([ec])
    router = Router(
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--auth=jwt", "--jwt-public-key", str(key_file), "--jwks-url", jwks.url),
        secure=True,
    )
    agent_token = rsa.token("pod-1", workflows=[WF], role="agent")
    agent = AgentProc(router.address, WF, "--tls-ca", str(pki.ca), "--token", agent_token, tls=True)
    try:
        yield Setup(pki, rsa, ec, router, agent)
    finally:
        agent.stop()
        router.stop()
        jwks.close()


def test_valid_user_token_over_tls(setup: Setup) -> None:
    result = run_client("exec", *setup.client("--", "echo", "over tls"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"over tls\n"
    end = setup.router.wait_for(lambda r: r.get("event") == "session end" and r.get("user") == "alice")
    assert end["workflow"] == WF and end["operation"] == "exec" and end["exit_status"] == "code 0"
    assert end["bytes_to_client"] > 0 and end["peer"].startswith("ipv4:127.0.0.1")


def test_es256_token_from_jwks_over_tls(setup: Setup) -> None:
    token = setup.ec.token("erin", workflows=["*"])
    result = run_client("exec", *setup.client("--", "sh", "-c", "exit 3", token=token))
    assert result.returncode == 3, result.stderr
    end = setup.router.wait_for(lambda r: r.get("event") == "session end" and r.get("user") == "erin")
    assert end["exit_status"] == "code 3"


def _refusal_cases(s: Setup) -> dict[str, tuple[list[str], str]]:
    foreign = Signer.rs256()
    return {
        "no token": (s.client(token=None), "no bearer token"),
        "expired": (s.client(token=s.rsa.token(workflows=[WF], ttl=-300)), "token expired"),
        "signed by another key": (s.client(token=foreign.token(workflows=[WF])), "signature is not valid"),
        "wrong audience": (s.client(token=s.rsa.token(workflows=[WF], aud="other")), "audience is not"),
        "another workflow": (s.client(token=s.rsa.token(workflows=[OTHER_WF])), "no access to workflow"),
        "agent token as a user": (
            s.client(token=s.rsa.token("pod-1", workflows=[WF], role="agent")),
            "agents cannot open client sessions",
        ),
        "plaintext client": (s.client(tls=False), "router speaks TLS"),
        "untrusted server certificate": (s.client(ca=s.pki.other_ca), "certificate not trusted"),
    }


def run_clients(*argvs: list[str]) -> list[subprocess.CompletedProcess[bytes]]:
    """Run several clients at once (each is a process of its own; together they take one's time)."""
    with ThreadPoolExecutor(len(argvs)) as pool:
        return list(pool.map(lambda argv: run_client(*argv), argvs))


def test_refused_with_255_and_a_message(setup: Setup) -> None:
    cases = _refusal_cases(setup)
    results = run_clients(*(["exec", *flags, "--", "echo", "must not run"] for flags, _ in cases.values()))
    for (case, (_, message)), result in zip(cases.items(), results, strict=True):
        stderr = result.stderr.decode()
        assert result.returncode == 255, f"{case}: {result}"
        assert result.stdout == b"", case
        assert message in stderr, f"{case}: {stderr}"
        assert len(stderr.strip().splitlines()) == 1, f"{case}: expected one clear line, got: {stderr}"


def test_refusals_reach_raw_callers_cleanly(setup: Setup) -> None:
    """A refused caller sees the reason (never a bare INTERNAL), and a silent one is not held open."""

    async def scenario() -> None:
        credentials = grpc.ssl_channel_credentials(setup.pki.ca.read_bytes())
        channel = grpc.aio.secure_channel(setup.router.address, credentials)
        expired = setup.rsa.token(workflows=[WF], ttl=-300)

        async def slow_writer(method: str, message: bytes) -> Outcome:
            # The headers (and the token) go out first; the init follows a moment later, as on a busy machine.
            call = RawCall(channel, method, expired)
            await asyncio.sleep(0.2)
            await call.send(message)
            return await call.finish()

        try:
            outcomes = await asyncio.gather(
                *(exchange(channel, EXEC, expired, exec_init(WF)) for _ in range(10)),
                *(slow_writer(EXEC, exec_init(WF)) for _ in range(5)),
                *(slow_writer(REGISTER, hello(WF)) for _ in range(5)),
            )
            for outcome in outcomes:
                assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, outcome
                assert outcome.details == "token expired"
            silent = RawCall(channel, EXEC, None)
            started = time.monotonic()
            outcome = await silent.finish(half_close=False)
            assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() - started < 5  # the refusal grace, not the 10s init deadline
        finally:
            await channel.close()

    asyncio.run(scenario())


def test_user_token_cannot_register_as_agent(setup: Setup) -> None:
    user_token = setup.rsa.token("alice", workflows=["*"])
    impostor = AgentProc(
        setup.router.address, WF, "--tls-ca", str(setup.pki.ca), "--token", user_token, tls=True, wait=False
    )
    try:
        line = impostor.wait_for(lambda r: "cannot register with the router" in r.get("msg", ""))
        assert "PERMISSION_DENIED" in line["msg"] and "not an agent" in line["msg"]
        assert not any(r.get("event") == "registered" for r in impostor.events())
    finally:
        impostor.stop()


def test_agent_token_cannot_register_for_another_workflow(setup: Setup) -> None:
    token = setup.rsa.token("pod-9", workflows=[OTHER_WF], role="agent")
    stray = AgentProc(setup.router.address, WF, "--tls-ca", str(setup.pki.ca), "--token", token, tls=True, wait=False)
    try:
        line = stray.wait_for(lambda r: "cannot register with the router" in r.get("msg", ""))
        assert "PERMISSION_DENIED" in line["msg"] and WF in line["msg"]
    finally:
        stray.stop()


def test_router_still_serves_after_every_refusal(setup: Setup) -> None:
    result = run_client("exec", *setup.client("--", "echo", "still here"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"still here\n"
    refused = [r for r in setup.router.events() if r.get("event") == "session refused"]
    reasons = " | ".join(str(r.get("reason")) for r in refused)
    for expected in ("no bearer token", "token expired", "signature is not valid", "audience", "no access"):
        assert expected in reasons, reasons
    text = setup.router.metrics_text()
    assert metric_value(text, "router_grpc_errors_total", {"operation": "exec", "code": "UNAUTHENTICATED"}) >= 4
    assert metric_value(text, "router_grpc_sessions_active", {"operation": "exec"}) == 0
    assert metric_value(text, "router_grpc_agents_registered") == 1


def test_tls_client_against_plaintext_router(router: Router) -> None:
    result = run_client("exec", "--router-address", router.address, "--workflow-id", "wf", "--", "true")
    assert result.returncode == 255
    assert b"router does not speak TLS" in result.stderr, result.stderr


def test_mutual_tls_requires_client_certificates(setup: Setup) -> None:
    pki = setup.pki
    key_file = pki.ca.parent / "jwt-rsa.pub.pem"
    router = Router(
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)),
        *("--auth=jwt", "--jwt-public-key", str(key_file)),
        secure=True,
    )
    cert = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    agent_token = setup.rsa.token("pod-2", workflows=[WF], role="agent")
    agent = AgentProc(router.address, WF, "--tls-ca", str(pki.ca), "--token", agent_token, *cert, tls=True)
    try:
        base = ["--router-address", router.address, "--workflow-id", WF, "--tls-ca", str(pki.ca)]
        base += ["--token", setup.rsa.token(workflows=[WF])]
        rogue = ["--tls-cert", str(pki.rogue_server_cert), "--tls-key", str(pki.rogue_server_key)]
        no_cert, untrusted, result = run_clients(
            ["exec", *base, "--", "true"],
            ["exec", *base, *rogue, "--", "true"],
            ["exec", *base, *cert, "--", "echo", "mutual"],
        )
        assert no_cert.returncode == 255
        assert b"client certificate" in no_cert.stderr, no_cert.stderr
        assert untrusted.returncode == 255
        assert b"does not trust this client certificate" in untrusted.stderr, untrusted.stderr
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"mutual\n"
    finally:
        agent.stop()
        router.stop()


def test_unsafe_start_up_is_refused() -> None:
    cases = [
        (["--host", "0.0.0.0", "--auth=none", "--tls-enabled=false"], b"only allowed on a loopback --host"),
        (["--auth=jwt", "--tls-enabled=false"], b"needs --jwt-public-key or --jwks-url"),
        (["--auth=none", "--tls-enabled=false", "--max-message-size", "1000"], b"--max-message-size must be"),
        (["--auth=none"], b"TLS is on by default and --tls-cert"),
        (
            ["--auth=jwt", "--tls-enabled=false", "--jwt-public-key", "/nonexistent/jwt.pem"],
            b"cannot start: --jwt-public-key /nonexistent/jwt.pem cannot be read: No such file or directory",
        ),
    ]
    procs = [
        subprocess.Popen(
            router_cmd("serve", "--port", "0", "--metrics-port", "-1", "--tls-cert", "/nonexistent/tls.crt", *flags),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=cli_env(),
        )
        for flags, _ in cases
    ]
    for (flags, message), proc in zip(cases, procs, strict=True):
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0, flags
        assert message in stderr, (flags, stderr)
        assert b"listening" not in stderr
