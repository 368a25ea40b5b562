"""The QEMU guest tier: every test module in tests/kernel/ runs inside a guest booting Debian's 6.12 kernel.

On the host, each test collected here is replaced by a stand-in of the same node id. The first stand-in
to run boots one guest (tests/kernel/guest.py) that runs pytest on all of the session's selected guest
tests at once, as root, with ``AUTHD_REQUIRE_PRIVILEGED=1``; each stand-in then reports its test's
outcome there, failures with the guest's traceback. Inside the guest (``AUTHD_GUEST=1``) the tests are
collected and run as they are. Fixtures and skip/xfail conditions are evaluated in the guest only.

The tier needs root, QEMU and the image's tools (``make system-deps``); where they are missing it
skips, and in CI (``AUTHD_REQUIRE_PRIVILEGED=1``) it fails instead.

To add guest tests, add a ``test_*.py`` module here: it is collected like any other, but its fixtures,
marks and body run in the guest, where the host's tools and the project's venv are at their usual paths
and everything may be written (it stays in the guest). A kernel module it needs goes in
``tests.kernel.image.MODULES``. Something other than pytest (a benchmark) can boot its own guest with
``tests.kernel.guest.run_in_guest``. A guest test that uses the e2e tier's ``cluster`` fixture
(authd/devcluster) has the cluster's warnings and errors attached to its failure, as e2e tests do.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _pytest import nodes

from tests.e2e.conftest import pytest_runtest_makereport
from tests.kernel.guest import GuestRun, run_in_guest, unavailable
from tests.kernel.image import image
from tests.kernel.report import REPORT, Outcome, accounted, outcomes

__all__ = ["pytest_runtest_makereport"]  # the e2e hook, for guest tests on a devcluster

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IN_GUEST = os.environ.get("AUTHD_GUEST") == "1"
TIER_TIMEOUT = 480.0
# Conditions that would be evaluated against the host's kernel: the guest evaluates them instead.
GUEST_ONLY_MARKS = frozenset({"skip", "skipif", "xfail", "usefixtures", "parametrize"})


class GuestTestError(Exception):
    """A guest test failed (or never reported); the message is the guest's account of it."""


class GuestTest(pytest.Item):
    """The host's stand-in for one test that runs in the guest."""

    def __init__(self, *, original: pytest.Item, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.original = original
        for mark in original.own_markers:
            self.own_markers.append(mark)
            self.keywords[mark.name] = mark

    def iter_markers_with_node(self, name: str | None = None) -> Iterator[tuple[nodes.Node, pytest.Mark]]:
        """The markers, the module's and class's too, but for those the guest evaluates."""
        for node, mark in super().iter_markers_with_node(name):
            if mark.name not in GUEST_ONLY_MARKS:
                yield node, mark

    def reportinfo(self) -> tuple[Path, int | None, str]:
        path, line, name = self.original.reportinfo()
        return Path(path), line, name

    def runtest(self) -> None:
        outcome = _tier(self.session).outcome(self.nodeid)
        if outcome.result == "skipped":
            pytest.skip(outcome.detail)
        if outcome.result == "xfailed":
            pytest.xfail(outcome.detail)
        if outcome.result != "passed":
            raise GuestTestError(outcome.detail)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, GuestTestError):
            return f"in the QEMU guest: {excinfo.value}"
        return str(super().repr_failure(excinfo, style))


class Tier:
    """The one guest run of a session, started by the first stand-in that asks for an outcome."""

    def __init__(self, session: pytest.Session) -> None:
        self._session = session
        self._outcomes: dict[str, Outcome] | None = None
        self._run: GuestRun | None = None
        self._unavailable: str | None = None
        self._started = False

    def outcome(self, nodeid: str) -> Outcome:
        if not self._started:
            self._started = True  # once: a start that raised fails the first test, not a boot per test
            self._start()
        if self._unavailable is not None:
            if os.environ.get("AUTHD_REQUIRE_PRIVILEGED") == "1":
                pytest.fail(f"the QEMU guest tier cannot run here and CI requires it: {self._unavailable}")
            pytest.skip(self._unavailable)
        if self._outcomes is None or self._run is None:
            return Outcome("failed", "the guest did not start: see the session's first guest test")
        found = self._outcomes.get(nodeid)
        if found is None:
            return Outcome("failed", f"no result from the guest\n{self._run.describe()}")
        return found

    def _start(self) -> None:
        self._unavailable = unavailable()
        if self._unavailable is not None:
            return
        nodeids = [item.nodeid for item in self._session.items if isinstance(item, GuestTest)]
        started = time.monotonic()
        built, build_seconds = image()
        argv = [sys.executable, "-m", "pytest", "-p", "tests.kernel.report", "-p", "no:cacheprovider"]
        self._run = run_in_guest(
            built,
            [*argv, "-q", "--", *nodeids],
            cwd=REPO,
            env={"AUTHD_GUEST": "1", "AUTHD_REQUIRE_PRIVILEGED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
            timeout=TIER_TIMEOUT - (time.monotonic() - started),
        )
        found = outcomes(self._run.files.get(REPORT, b"").decode())
        self._outcomes = accounted(found, self._run.returncode, self._run.describe())
        built_note = "cached" if build_seconds is None else f"built in {build_seconds:.0f} s"
        print(  # noqa: T201 - the tier's figures, for the report (pytest -s shows them)
            f"\n[kernel tier] {len(nodeids)} tests in the guest ({built.release}, image {built_note}): "
            f"{self._run.seconds:.0f} s"
        )


TIER = pytest.StashKey[Tier]()


def _tier(session: pytest.Session) -> Tier:
    if TIER not in session.stash:
        session.stash[TIER] = Tier(session)
    return session.stash[TIER]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark this directory's tests ``kernel``; on the host, replace them with their stand-ins."""
    for index, item in enumerate(items):
        if HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.kernel)
        if not IN_GUEST:
            assert item.parent is not None
            items[index] = GuestTest.from_parent(item.parent, name=item.name, original=item)
