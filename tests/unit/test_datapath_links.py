from __future__ import annotations

import asyncio

import pytest
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from authd.datapath.links import DUMP_ATTEMPTS, Link, LinkWatcher, list_links_async, matches
from authd.errors import DatapathError
from tests.fakes.backoff import CountingBackoff


def test_patterns_are_globs_over_names() -> None:
    assert matches("lxc12ab", ("lxc*",))
    assert matches("wg0", ("lxc*", "wg?"))
    assert not matches("eth0", ("lxc*", "wg?"))
    assert not matches("LXC1", ("lxc*",))
    assert not matches("anything", ())


def test_watcher_attaches_each_matching_link_once_and_survives_failures() -> None:
    attached: list[str] = []
    broken = {"lxcbad"}

    def attach(link: Link) -> None:
        if link.name in broken:
            raise DatapathError("datapath: cannot attach to ifindex 9: No such device")
        attached.append(link.name)

    watcher = LinkWatcher(("lxc*",), attach, CountingBackoff())
    watcher.consider(Link(5, "lxc1", 1))
    watcher.consider(Link(5, "lxc1", 1))  # a link state change: same index, no second attach
    watcher.consider(Link(6, "eth0", 1))
    watcher.consider(Link(9, "lxcbad", 1))
    assert attached == ["lxc1"]
    assert set(watcher.attached) == {5}
    assert watcher.failures == 1
    watcher.forget(5)
    watcher.consider(Link(5, "lxc2", 1))  # the index came back as another link
    assert attached == ["lxc1", "lxc2"]


class InterruptedDumps:
    """A link dump interrupted (NLM_F_DUMP_INTR) the first ``interruptions`` times, as under pod churn."""

    def __init__(self, interruptions: int, links: list[Link]) -> None:
        self.interruptions = interruptions
        self.links = links
        self.calls = 0

    async def __call__(self) -> list[Link]:
        self.calls += 1
        if self.calls <= self.interruptions:
            raise NetlinkDumpInterrupted
        return list(self.links)


async def test_an_interrupted_dump_is_repeated_with_backoff() -> None:
    dump = InterruptedDumps(DUMP_ATTEMPTS - 1, [Link(5, "lxc1", 1), Link(6, "eth0", 1)])
    backoff = CountingBackoff()
    assert [link.name for link in await list_links_async(dump, backoff)] == ["lxc1", "eth0"]
    assert (dump.calls, backoff.delays) == (DUMP_ATTEMPTS, DUMP_ATTEMPTS - 1)


async def test_dumps_interrupted_every_time_are_bounded() -> None:
    dump = InterruptedDumps(DUMP_ATTEMPTS, [])
    with pytest.raises(DatapathError, match="interrupted"):
        await list_links_async(dump, CountingBackoff())
    assert dump.calls == DUMP_ATTEMPTS


async def test_the_watcher_outlives_churn_longer_than_the_dump_retries() -> None:
    """Dumps interrupted past the bound: the watcher backs off, subscribes again, and attaches."""
    attached: list[str] = []
    synced = asyncio.Event()
    dump = InterruptedDumps(2 * DUMP_ATTEMPTS + 3, [Link(5, "lxc1", 1)])
    backoff = CountingBackoff()
    watcher = LinkWatcher(
        ("lxc*",), lambda link: attached.append(link.name), backoff, dump=dump, dump_backoff=CountingBackoff()
    )
    task = asyncio.create_task(watcher.run(synced.set))
    try:
        await asyncio.wait_for(synced.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert attached == ["lxc1"]
    assert backoff.delays == 2  # two failed subscriptions, each backed off; the third synced
    assert backoff.resets == 1
