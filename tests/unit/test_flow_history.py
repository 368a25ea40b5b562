from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from authd.config import parse_config
from authd.config.model import HISTORY_MIN_BYTES
from authd.errors import ConfigError
from authd.flows import FlowLog, get_flows
from authd.hubble._proto import observer_pb2
from authd.hubble.history import CURRENT, HEADER, LENGTH, PREVIOUS, FlowHistory
from tests.unit.test_flows import NAMES, WHEN, event


def ports(history: FlowHistory) -> list[int]:
    return [flow.l4.TCP.source_port for flow in history.load()]


def write(directory: Path, count: int, *, first: int = 0, max_bytes: int = HISTORY_MIN_BYTES) -> FlowLog:
    log = FlowLog(NAMES, history=FlowHistory(directory, max_bytes))
    for port in range(first, first + count):
        log.add(event(src_port=port, timestamp=WHEN + timedelta(seconds=port)))
    return log


def closed(log: FlowLog) -> None:
    assert log._history is not None
    log._history.close()


async def test_a_new_flow_log_answers_since_with_the_flows_of_the_last_run(tmp_path: Path) -> None:
    closed(write(tmp_path, 5))
    restarted = FlowLog(NAMES, history=FlowHistory(tmp_path, HISTORY_MIN_BYTES))
    request = observer_pb2.GetFlowsRequest()
    request.since.FromDatetime(WHEN + timedelta(seconds=2))
    answered = [r.flow async for r in get_flows(restarted, request)]
    assert [f.l4.TCP.source_port for f in answered] == [2, 3, 4]
    assert answered[0].source.labels[0] == f"spiffe:id={NAMES.identities[256]}"  # as resolved back then
    assert restarted.total == 0  # nothing new seen by this run


def test_the_history_is_readable_by_root_only(tmp_path: Path) -> None:
    directory = tmp_path / "flows"
    closed(write(directory, 1))
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / CURRENT).stat().st_mode & 0o777 == 0o600


def test_a_restarted_log_goes_on_writing_after_the_last_runs_flows(tmp_path: Path) -> None:
    closed(write(tmp_path, 3))
    closed(write(tmp_path, 2, first=3))
    assert ports(FlowHistory(tmp_path, HISTORY_MIN_BYTES)) == [0, 1, 2, 3, 4]


def test_the_disk_holds_at_most_the_configured_bytes_and_the_newest_flows(tmp_path: Path) -> None:
    closed(write(tmp_path, 2000))
    on_disk = sum(path.stat().st_size for path in tmp_path.iterdir())
    assert on_disk <= HISTORY_MIN_BYTES
    kept = ports(FlowHistory(tmp_path, HISTORY_MIN_BYTES))
    assert kept == list(range(2000 - len(kept), 2000))  # the newest, in order
    assert len(kept) > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT, PREVIOUS]


def test_a_torn_tail_is_cut_and_writing_goes_on_after_the_last_good_flow(tmp_path: Path) -> None:
    closed(write(tmp_path, 3))
    current = tmp_path / CURRENT
    current.write_bytes(current.read_bytes()[:-5])  # killed in the middle of a write
    history = FlowHistory(tmp_path, HISTORY_MIN_BYTES)
    log = FlowLog(NAMES, history=history)
    assert [f.l4.TCP.source_port for f in log] == [0, 1]
    assert history.discarded == 1
    log.add(event(src_port=7))
    history.close()
    reread = FlowHistory(tmp_path, HISTORY_MIN_BYTES)
    assert ports(reread) == [0, 1, 7]
    assert reread.discarded == 0


@pytest.mark.parametrize(
    "tail",
    [
        LENGTH.pack(3) + b"\xff\xff\xff",  # not a protobuf message
        LENGTH.pack(2) + b"\x18\x01",  # a flow without a time
        LENGTH.pack(1 << 30),  # a length past the end
        b"\x01",  # half a length
    ],
    ids=["garbage", "no-time", "long", "short"],
)
def test_a_record_that_is_not_a_flow_ends_the_segment(tmp_path: Path, tail: bytes) -> None:
    closed(write(tmp_path, 2))
    current = tmp_path / CURRENT
    current.write_bytes(current.read_bytes() + tail + current.read_bytes()[len(HEADER) :])
    history = FlowHistory(tmp_path, HISTORY_MIN_BYTES)
    assert ports(history) == [0, 1]  # the copies after the bad record are not trusted
    assert history.discarded == 1


def test_a_foreign_file_is_skipped_whole(tmp_path: Path) -> None:
    (tmp_path / PREVIOUS).write_bytes(b"not authd's flows\n")
    closed(write(tmp_path, 1))
    history = FlowHistory(tmp_path, HISTORY_MIN_BYTES)
    assert ports(history) == [0]
    assert history.discarded == 1


def test_a_flow_that_cannot_be_written_is_counted_and_the_log_goes_on(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    history = FlowHistory(blocked / "flows", HISTORY_MIN_BYTES)  # its parent is a file
    log = FlowLog(NAMES, history=history)
    log.add(event())
    log.add(event())
    assert len(log) == 2
    assert history.write_errors == 2


@pytest.mark.parametrize("value", [1, HISTORY_MIN_BYTES - 1])
def test_a_history_too_small_to_hold_flows_is_refused(value: int) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[hubble]\nhistory_bytes = {value}\n")
    assert caught.value.problems[0].startswith("hubble.history_bytes: must be 0 (no history) or at least")
    assert parse_config("[hubble]\nhistory_bytes = 0\n").hubble.history_bytes == 0
