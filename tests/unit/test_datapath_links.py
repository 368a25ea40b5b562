from __future__ import annotations

from authd.datapath.links import Link, LinkWatcher, matches
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
