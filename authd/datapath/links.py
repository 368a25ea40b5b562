"""Which interfaces get authd's programs: glob patterns over link names.

The patterns apply to existing links and to links that appear later (netlink RTM_NEWLINK), the way a CNI
hooks each new pod's host-side veth.

A link dump that spans several netlink messages is interrupted (``NLM_F_DUMP_INTR``, pyroute2's
``NetlinkDumpInterrupted``) when links change while it is read, which pod churn does all the time: the
dump is then repeated, up to :data:`DUMP_ATTEMPTS` times with a short backoff. Should churn outlast
them, the watcher backs off and subscribes again like after any other netlink failure; it never ends.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK

from authd.backoff import BackoffFactory, BackoffPolicy
from authd.errors import DatapathError

log = structlog.get_logger(__name__)

DUMP_ATTEMPTS = 8
"""How often a link dump is tried while links keep changing under it."""
DUMP_BACKOFF = BackoffPolicy(initial=0.005, maximum=0.2)
"""Between interrupted dumps: short, links settle within milliseconds between pod creations."""


@dataclass(frozen=True, slots=True)
class Link:
    """A network interface: index, name and ARPHRD link type."""

    index: int
    name: str
    link_type: int


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches any glob pattern (case-sensitive, like interface names)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _link_of(msg: object) -> Link | None:
    get = getattr(msg, "get", None)
    if get is None:
        return None
    name = get("ifname")
    index = get("index")
    if not isinstance(name, str) or not isinstance(index, int):
        return None
    return Link(index=index, name=name, link_type=int(get("ifi_type") or 0))


def list_links() -> list[Link]:
    """Every link in the calling thread's network namespace (blocking; not inside an event loop)."""
    return asyncio.run(list_links_async())


async def dump_links() -> list[Link]:
    """One dump of every link in the network namespace; raises pyroute2's NetlinkError on failure."""
    async with AsyncIPRoute() as ipr:
        return [link async for msg in await ipr.get_links() if (link := _link_of(msg)) is not None]


LinkDump = Callable[[], Awaitable[list[Link]]]
"""One attempt at listing the links (:func:`dump_links`); may raise NetlinkDumpInterrupted."""


async def list_links_async(dump: LinkDump = dump_links, backoff: BackoffFactory = DUMP_BACKOFF) -> list[Link]:
    """Every link in the network namespace, from inside the event loop; interrupted dumps are repeated."""
    delays = backoff()
    for attempt in range(1, DUMP_ATTEMPTS + 1):
        try:
            return await dump()
        except NetlinkDumpInterrupted:
            if attempt == DUMP_ATTEMPTS:
                break
            await asyncio.sleep(delays.next_delay())
        except NetlinkError as err:
            raise DatapathError(f"datapath: cannot list links: {err}") from err
    raise _interrupted()


def _interrupted() -> DatapathError:
    return DatapathError(
        f"datapath: cannot list links: dump interrupted {DUMP_ATTEMPTS} times, links keep changing"
    )


Attach = Callable[[Link], None]
"""Attaches authd's programs to a link; raises DatapathError when it cannot."""


class LinkWatcher:
    """Attaches to matching links now and whenever one appears, until cancelled."""

    def __init__(
        self,
        patterns: tuple[str, ...],
        attach: Attach,
        backoff: BackoffFactory,
        *,
        dump: LinkDump = dump_links,
        dump_backoff: BackoffFactory = DUMP_BACKOFF,
        recheck: Callable[[Link], None] = lambda _link: None,
        removed: Callable[[Link], None] = lambda _link: None,
    ) -> None:
        """Call ``attach`` once per new matching link index, ``recheck`` on later events for it.

        ``removed`` is called whenever any link goes away.
        """
        self.patterns = patterns
        self._attach = attach
        self._recheck = recheck
        self._removed = removed
        self._backoff = backoff
        self._dump = dump
        self._dump_backoff = dump_backoff
        self.attached: dict[int, Link] = {}
        self.failures = 0

    def consider(self, link: Link) -> None:
        """Attach to ``link`` if it matches and is not attached yet; a failure is logged and counted."""
        if link.index in self.attached:
            self._recheck(link)
            return
        if not matches(link.name, self.patterns):
            return
        try:
            self._attach(link)
        except DatapathError as err:
            # Typically the link vanished between the event and the attach; a new one brings a new event.
            self.failures += 1
            log.warning("cannot attach to interface", interface=link.name, ifindex=link.index, error=str(err))
            return
        self.attached[link.index] = link
        log.info("attached to interface", interface=link.name, ifindex=link.index)

    def forget(self, index: int) -> None:
        """A link went away; its index may come back as another link."""
        self.attached.pop(index, None)

    async def attach_existing(self) -> None:
        """Attach to every matching link that exists now."""
        for link in await list_links_async(self._dump, self._dump_backoff):
            self.consider(link)

    async def run(self, on_synced: Callable[[], None] = lambda: None) -> None:
        """Watch link events; reconnects with backoff when the netlink socket fails.

        ``on_synced`` is called each time existing links have been attached after (re)subscribing.
        """
        backoff = self._backoff()

        def synced() -> None:
            backoff.reset()
            on_synced()

        while True:
            try:
                await self._watch(synced)
            except (NetlinkError, OSError, DatapathError) as err:  # DatapathError: the dump kept failing
                delay = backoff.next_delay()
                log.warning("link watch failed, retrying", error=str(err), retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)

    async def _watch(self, on_connected: Callable[[], None]) -> None:
        async with AsyncIPRoute() as events:
            # Subscribe before listing so that a link created in between is not missed.
            await events.bind(groups=RTMGRP_LINK)
            await self.attach_existing()
            on_connected()
            while True:
                async for msg in events.get():
                    link = _link_of(msg)
                    if link is None:
                        continue
                    if msg.get("event") == "RTM_DELLINK":
                        self.forget(link.index)
                        self._removed(link)
                    elif msg.get("event") == "RTM_NEWLINK":
                        self.consider(link)
