"""Command-line plumbing: durations, Go-style booleans, the legacy --operation form, exit codes."""

from __future__ import annotations

import asyncio

import click
import pytest

from osmo_router.cli.durations import parse_bool, parse_duration
from osmo_router.cli.main import main_group as router_group
from osmo_router.cli.options import bool_option_names, normalize_bool_flags, prefers_uvloop, run_async
from osmo_router.client.cli import main_group as client_group
from osmo_router.client.cli import rewrite_legacy_operation
from osmo_router.client.exec import exit_code_of
from osmo_router.router.config import RouterConfig, is_loopback_host
from osmo_router.wire.protocol import pb


@pytest.mark.parametrize(
    ("text", "seconds"), [("30m", 1800), ("60s", 60), ("1h30m", 5400), ("250ms", 0.25), ("2.5", 2.5), ("1h", 3600)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "m5", "1h 2m", "-"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)


def test_booleans() -> None:
    assert parse_bool("false") is False and parse_bool("TRUE") is True and parse_bool("0") is False
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_go_style_booleans_become_click_flags() -> None:
    names = bool_option_names(router_group)
    assert "tls-enabled" in names and "tls" in names
    args = ["serve", "--tls-enabled=false", "--port", "1", "--", "--tls-enabled=false"]
    assert normalize_bool_flags(args, names) == [
        "serve",
        "--no-tls-enabled",
        "--port",
        "1",
        "--",
        "--tls-enabled=false",
    ]
    assert normalize_bool_flags(["--tty=true"], bool_option_names(client_group)) == ["--tty"]
    with pytest.raises(click.UsageError):
        normalize_bool_flags(["--tls=perhaps"], ["tls"])


def test_legacy_operation_form() -> None:
    assert rewrite_legacy_operation(["--operation=exec", "--tls=false", "--", "ls"]) == [
        "exec",
        "--tls=false",
        "--",
        "ls",
    ]
    assert rewrite_legacy_operation(["--operation", "portforward", "--remote-port=80"])[0] == "port-forward"
    assert rewrite_legacy_operation(["exec", "--", "--operation=rsync"]) == ["exec", "--", "--operation=rsync"]
    with pytest.raises(click.UsageError):
        rewrite_legacy_operation(["--operation=teleport"])


def test_exit_codes() -> None:
    assert exit_code_of(pb.ExitStatus(code=7)) == 7
    assert exit_code_of(pb.ExitStatus(signal=15)) == 143
    assert exit_code_of(pb.ExitStatus(code=256 + 3)) == 3


def test_auth_none_only_on_loopback() -> None:
    assert is_loopback_host("127.0.0.2") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("10.0.0.1")
    RouterConfig(host="127.0.0.1", auth="none").validate()
    with pytest.raises(ValueError, match="only allowed on a loopback"):
        RouterConfig(host="0.0.0.0", auth="none").validate()


def test_router_defaults_match_the_design() -> None:
    serve = router_group.commands["serve"]
    defaults = {p.name: p.default for p in serve.params}
    assert defaults["port"] == 50051 and defaults["metrics_port"] == 8080 and defaults["tls_enabled"] is True
    assert defaults["tls_cert"] == "/etc/router/tls/tls.crt" and defaults["tls_key"] == "/etc/router/tls/tls.key"
    assert defaults["session_ttl"] == "30m" and defaults["rendezvous_timeout"] == "60s"
    assert defaults["flow_control_buffer"] == 16 and defaults["flow_control_timeout"] == "30s"


def test_a_write_that_meets_the_ended_call_is_named_by_this_clients_own_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpc.aio's INTERNAL (execute_batch) hides the router's status: a recent stall says it was flow control."""
    import grpc

    from osmo_router.client import session
    from osmo_router.client.stall import StallMeter
    from osmo_router.wire.errors import ResourceExhausted, Unavailable

    err = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Internal error from Core",
        debug_error_string="INTERNAL: execute_batch ... grpc_call_start_batch",
    )
    meter = StallMeter()
    monkeypatch.setattr(session, "METER", meter)
    assert isinstance(session.rpc_error(err), Unavailable)  # no stall: the agent or the router went away
    assert isinstance(session.rpc_error(err, stalled=2.5), ResourceExhausted)  # a connection's reader stalled
    meter.note(0.4)  # too short to matter
    assert isinstance(session.rpc_error(err), Unavailable)
    meter.note(3.0)  # e.g. SIGSTOP, or a blocked stdout
    error = session.rpc_error(err)
    assert isinstance(error, ResourceExhausted) and "stopped reading" in error.message and "3.0s" in error.message


def test_a_connection_lost_under_an_open_call_is_named_so() -> None:
    """gRPC's 'Stream removed' (the router died, the network cut) reads as the connection breaking."""
    import grpc

    from osmo_router.client import session

    def failed(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)

    lost = session.rpc_error(failed(grpc.StatusCode.UNAVAILABLE, "Stream removed (recvmsg:Connection reset by peer)"))
    assert lost.message.startswith("the connection to the router broke") and "Stream removed" in lost.message
    other = session.rpc_error(failed(grpc.StatusCode.UNAVAILABLE, "the agent disconnected"))
    assert other.message == "the agent disconnected"


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


@pytest.mark.parametrize(
    ("channel", "env", "loop"),
    [
        ("native", "", "uvloop"),  # the default channel: uvloop (issue 18)
        ("grpcio", "", "asyncio"),  # grpc.aio keeps the standard loop (a SIGSEGV seen with uvloop)
        ("native", "0", "asyncio"),
        ("grpcio", "1", "uvloop"),
    ],
)
def test_the_cli_and_agent_run_on_uvloop_with_the_native_channel(
    monkeypatch: pytest.MonkeyPatch, channel: str, env: str, loop: str
) -> None:
    monkeypatch.setenv("OSMO_UVLOOP", env)
    assert run_async(_loop_module(), prefer_uvloop=prefers_uvloop(channel)) == loop


@pytest.mark.parametrize("command", ["serve", "local"])
@pytest.mark.parametrize(("flag", "value"), [("--port", "65536"), ("--port", "-1"), ("--metrics-port", "99999"),
                                             ("--metrics-port", "-2"), ("--ws-port", "70000")])  # fmt: skip
def test_a_port_outside_its_range_is_a_usage_error(command: str, flag: str, value: str) -> None:
    with pytest.raises(click.BadParameter, match="not in the range"):
        router_group.commands[command].make_context(command, [flag, value])


def test_attach_with_an_empty_key_is_a_usage_error() -> None:
    from click.testing import CliRunner

    args = ["attach", " ", "--router-address", "127.0.0.1:1", "--workflow-id", "wf", "--no-tls"]
    result = CliRunner().invoke(client_group, args)
    assert result.exit_code == 2
    assert "SESSION_KEY: is empty" in result.output


@pytest.mark.parametrize(
    ("typed", "named"), [("-a", "-a"), ("--partial", "--partial"), ("-avz", "-a"), ("--chmod=u+x", "--chmod")]
)
def test_an_rsync_option_before_the_separator_says_where_it_goes(typed: str, named: str) -> None:
    from click.testing import CliRunner

    args = ["rsync", "--router-address", "127.0.0.1:1", "--workflow-id", "w", typed, "src/", ":dst/"]
    result = CliRunner().invoke(client_group, args)
    assert result.exit_code == 2
    assert f"No such option '{named}'" in result.output
    assert f"rsync's own options go after `--`: osmo-net-client rsync SRC... DST -- {typed})" in result.output


def test_a_typo_of_an_rsync_command_option_gets_clicks_suggestion_alone() -> None:
    from click.testing import CliRunner

    args = ["rsync", "--router-address", "127.0.0.1:1", "--workflow-id", "w", "--bwlimt=10", "src/", ":dst/"]
    result = CliRunner().invoke(client_group, args)
    assert result.exit_code == 2
    assert "Did you mean '--bwlimit'?" in result.output
    assert "go after `--`" not in result.output


def test_exec_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from osmo_router.client.exec_cli import parse_env

    monkeypatch.setenv("OSMO_TEST_HERE", "v=1")
    monkeypatch.delenv("OSMO_TEST_UNSET", raising=False)
    assert parse_env(["A=1", "B=", "C=x=y", "OSMO_TEST_HERE", "A=2"]) == {
        "A": "2",
        "B": "",
        "C": "x=y",
        "OSMO_TEST_HERE": "v=1",
    }
    with pytest.raises(click.UsageError, match="OSMO_TEST_UNSET is not set here"):
        parse_env(["OSMO_TEST_UNSET"])
    with pytest.raises(click.UsageError, match="is not NAME=VALUE"):
        parse_env(["=value"])
    with pytest.raises(click.UsageError, match="is not UTF-8"):
        parse_env(["A=caf\udce9"])


def test_exec_env_is_refused_for_an_old_backend() -> None:
    from osmo_router.client.legacy import LegacyUsageError, check_exec

    check_exec([], {})
    with pytest.raises(LegacyUsageError, match="--env cannot be carried"):
        check_exec([], {"A": "1"})
    with pytest.raises(LegacyUsageError, match="--workdir cannot be carried"):
        check_exec([], {}, "/w")
