from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path

import grpc
import pytest

from authd.config import parse_config
from authd.errors import ConfigError, SpireError
from authd.spire.endpoint import Endpoint, check_admin_socket, parse_endpoint, workload_endpoint
from authd.spire.stream import StreamFailure, classify, follow, unwrap_spire_error
from tests.fakes.backoff import CountingBackoff


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


# ------------------------------------------------------------------------------------------ endpoints


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("unix:///run/spire/agent/public/api.sock", "unix:///run/spire/agent/public/api.sock"),
        ("unix:/run/api.sock", "unix:///run/api.sock"),
        ("/run/api.sock", "unix:///run/api.sock"),
        ("tcp://127.0.0.1:8081", "ipv4:127.0.0.1:8081"),
        ("tcp://[::1]:8081", "ipv6:[::1]:8081"),
    ],
)
def test_endpoint_forms_the_spec_allows(text: str, target: str) -> None:
    assert parse_endpoint(text).target == target


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("unix://host/run/api.sock", "no authority"),
        ("unix:///run/api.sock?x=1", "no query"),
        ("tcp://localhost:8081", "IP address"),
        ("tcp://127.0.0.1", "tcp://<IP>:<port>"),
        ("tcp://127.0.0.1:8081/path", "tcp://<IP>:<port>"),
        ("http://127.0.0.1:8081", "unix:///absolute/path"),
        ("run/api.sock", "unix:///absolute/path"),
    ],
)
def test_endpoint_forms_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match="SPIFFE_ENDPOINT_SOCKET") as caught:
        parse_endpoint(text)
    assert why in str(caught.value)


def test_configured_socket_wins_over_environment() -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///from/env.sock"}
    configured = workload_endpoint(Path("/from/config.sock"), env)
    assert configured is not None
    assert configured.socket == Path("/from/config.sock")
    from_env = workload_endpoint(None, env)
    assert from_env is not None
    assert from_env.socket == Path("/from/env.sock")
    assert workload_endpoint(None, {}) is None


def test_admin_socket_inside_workload_socket_directory_is_refused() -> None:
    workload = Endpoint.unix(Path("/run/spire/public/api.sock"))
    check_admin_socket(workload, Path("/run/spire/private/admin.sock"))
    for bad in ("/run/spire/public/admin.sock", "/run/spire/public/sub/admin.sock"):
        with pytest.raises(ConfigError, match="admin_socket"):
            check_admin_socket(workload, Path(bad))


def test_config_refuses_admin_socket_beside_workload_socket() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('[spire]\nworkload_socket = "/run/a/api.sock"\nadmin_socket = "/run/a/admin.sock"\n')
    expected = (
        "spire.admin_socket: must not be inside the Workload API socket's directory '/run/a' "
        "(SPIRE refuses that too), got '/run/a/admin.sock'"
    )
    assert caught.value.problems == [expected]


def test_missing_socket_is_a_retryable_error(tmp_path: Path) -> None:
    with pytest.raises(SpireError, match="does not exist") as caught:
        Endpoint.unix(tmp_path / "absent.sock").check_reachable()
    assert caught.value.retryable


# ------------------------------------------------------------------------------------------ classify


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.UNIMPLEMENTED, False),
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.PERMISSION_DENIED, True),
        (grpc.StatusCode.INTERNAL, True),
        (grpc.StatusCode.UNKNOWN, True),
        (grpc.StatusCode.CANCELLED, True),
    ],
)
def test_classification_follows_the_workload_endpoint_spec(code: grpc.StatusCode, *, retryable: bool) -> None:
    failure = classify(rpc_error(code, "why"), "workload-api")
    assert failure.code is code
    assert failure.retryable is retryable
    assert str(failure.error) == f"spire: workload-api: {code.name} 'why'"


def test_classification_of_socket_errors() -> None:
    assert classify(OSError("connection refused"), "x").retryable
    assert classify(SpireError("spire: socket missing", retryable=True), "x").retryable
    with pytest.raises(TypeError):
        classify(ValueError("a bug"), "x")


def test_unwrap_finds_a_spire_error_in_nested_groups() -> None:
    error = SpireError("spire: refused", retryable=False)
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [error])])
    assert unwrap_spire_error(group) is error
    other = ExceptionGroup("outer", [ValueError("bug")])
    assert unwrap_spire_error(other) is other


# ------------------------------------------------------------------------------------------ follow


class Recorder:
    def __init__(self) -> None:
        self.messages: list[int] = []
        self.undecodable = 0
        self.failures: list[StreamFailure] = []
        self.up: list[str] = []
        self.down: list[str] = []

    def on_message(self, message: int) -> None:
        self.messages.append(message)

    def on_failure(self, failure: StreamFailure) -> None:
        self.failures.append(failure)

    def on_undecodable(self) -> None:
        self.undecodable += 1

    def stream_up(self, name: str) -> None:
        self.up.append(name)

    def stream_down(self, name: str, reason: str) -> None:
        self.down.append(f"{name}: {reason}")

    def stream_closed(self, name: str) -> None:
        raise AssertionError(f"unexpected close of {name}")


class Script:
    """Each opened stream yields its messages, then raises its error (None: ends normally)."""

    def __init__(self, *attempts: tuple[list[int], BaseException | None]) -> None:
        self.attempts = list(attempts)
        self.opened = 0

    async def open(self) -> AsyncGenerator[int, None]:
        self.opened += 1
        messages, error = self.attempts.pop(0)
        for message in messages:
            yield message
        if error is not None:
            raise error


async def no_sleep(delay: float) -> None:
    assert delay == 0.0


async def test_follow_retries_transient_failures_and_stops_on_invalid_argument() -> None:
    script = Script(
        ([1, None, 2], rpc_error(grpc.StatusCode.UNAVAILABLE)),  # type: ignore[list-item]
        ([], SpireError("spire: socket missing", retryable=True)),
        ([3], None),  # the server ended the stream: reconnect
        ([], rpc_error(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")),
        ([4], rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")),
    )
    recorder = Recorder()
    backoff = CountingBackoff()
    with pytest.raises(SpireError, match="INVALID_ARGUMENT") as caught:
        await follow("test", script.open, recorder, backoff=backoff, status=recorder, sleep=no_sleep)
    assert not caught.value.retryable
    assert recorder.messages == [1, 2, 3, 4]
    assert recorder.undecodable == 1  # grpc.aio yields None for a message it could not parse
    assert [f.code for f in recorder.failures] == [
        grpc.StatusCode.UNAVAILABLE,
        None,
        grpc.StatusCode.OK,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    ]
    assert script.opened == 5
    assert backoff.delays == 4  # one wait per retried failure, none after the refusal
    assert backoff.resets == 5  # every message received resets the backoff
    assert len(recorder.down) == 5


async def test_follow_stops_on_unimplemented() -> None:
    script = Script(([], rpc_error(grpc.StatusCode.UNIMPLEMENTED)))
    recorder = Recorder()
    with pytest.raises(SpireError, match="UNIMPLEMENTED"):
        await follow(
            "test", script.open, recorder, backoff=CountingBackoff(), status=recorder, sleep=no_sleep
        )
