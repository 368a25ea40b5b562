"""The QEMU guest tier's bookkeeping: the modules' load order, and the guest's reported outcomes."""

from __future__ import annotations

import json

import pytest

from tests.kernel.image import load_order
from tests.kernel.report import Outcome, accounted, outcomes

MODULES_DEP = """\
kernel/drivers/net/wireguard/wireguard.ko.xz: kernel/lib/crypto/libchacha20poly1305.ko.xz \
kernel/lib/crypto/libchacha.ko.xz kernel/net/ipv4/udp_tunnel.ko.xz
kernel/lib/crypto/libchacha20poly1305.ko.xz: kernel/lib/crypto/libchacha.ko.xz
kernel/lib/crypto/libchacha.ko.xz:
kernel/net/ipv4/udp_tunnel.ko.xz:
kernel/crypto/ghash-generic.ko.xz: kernel/lib/crypto/gf128mul.ko.xz
kernel/lib/crypto/gf128mul.ko.xz:
"""


def test_modules_load_after_what_they_need_and_each_once() -> None:
    assert load_order(MODULES_DEP, ("wireguard", "ghash_generic", "udp_tunnel")) == [
        "kernel/net/ipv4/udp_tunnel.ko.xz",
        "kernel/lib/crypto/libchacha.ko.xz",
        "kernel/lib/crypto/libchacha20poly1305.ko.xz",
        "kernel/drivers/net/wireguard/wireguard.ko.xz",
        "kernel/lib/crypto/gf128mul.ko.xz",
        "kernel/crypto/ghash-generic.ko.xz",
    ]


def test_a_module_the_kernel_lacks_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no module 'tls'"):
        load_order(MODULES_DEP, ("tls",))


def _line(nodeid: str, when: str, outcome: str, *, xfail: bool = False, detail: str = "") -> str:
    return json.dumps({"nodeid": nodeid, "when": when, "outcome": outcome, "xfail": xfail, "detail": detail})


def test_the_first_phase_that_fails_or_skips_decides_a_tests_outcome() -> None:
    lines = [
        *(_line("t::ok", when, "passed") for when in ("setup", "call", "teardown")),
        _line("t::teardown", "setup", "passed"),
        _line("t::teardown", "call", "passed"),
        _line("t::teardown", "teardown", "failed", detail="teardown: left a netns"),
        _line("t::skip", "setup", "skipped", detail="no tls"),
        _line("t::skip", "teardown", "passed"),
        _line("t::xfail", "setup", "passed"),
        _line("t::xfail", "call", "skipped", xfail=True, detail="known"),
        _line("t::crashed", "setup", "passed"),
    ]
    assert outcomes("\n".join(lines)) == {
        "t::ok": Outcome("passed"),
        "t::teardown": Outcome("failed", "teardown: left a netns"),
        "t::skip": Outcome("skipped", "no tls"),
        "t::xfail": Outcome("xfailed", "known"),
    }


def test_an_exit_status_that_contradicts_the_outcomes_fails_every_test() -> None:
    found = {"t::ok": Outcome("passed"), "t::bad": Outcome("failed", "assert")}
    assert accounted(found, 1, "why") == found
    assert accounted(found, None, "why") == found
    note = Outcome("failed", "the guest's pytest exited 3\nwhy")
    assert accounted(found, 3, "why") == {"t::ok": note, "t::bad": Outcome("failed", "assert")}
    assert accounted({"t::ok": Outcome("passed")}, 1, "why") == {
        "t::ok": Outcome("failed", "the guest's pytest exited 1\nwhy")
    }
