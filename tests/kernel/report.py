"""Test outcomes, as the guest's pytest reports them, and as the host reads them back.

Inside the guest, pytest runs with ``-p tests.kernel.report``: this plugin appends one JSON line per test
phase to ``$AUTHD_GUEST_JOB/report.jsonl`` as soon as the phase ends, so the tests that finished before a
crash or a timeout still have their outcome. :func:`outcomes` folds the lines into one per test.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPORT = "report.jsonl"


@dataclass(frozen=True)
class Outcome:
    """One test's result in the guest: ``passed``, ``failed``, ``skipped`` or ``xfailed``, and why."""

    result: str
    detail: str = ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Append this phase's outcome (failures with their traceback and captured output) to the report."""
    detail = ""
    if report.failed:
        sections = "".join(f"\n--- {title} ---\n{content}" for title, content in report.sections)
        detail = f"{report.when}: {report.longreprtext}{sections}"
    elif report.skipped:
        wasxfail = getattr(report, "wasxfail", None)
        detail = wasxfail if wasxfail is not None else _skip_reason(report)
    line = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "xfail": hasattr(report, "wasxfail"),
        "detail": detail,
    }
    with (Path(os.environ["AUTHD_GUEST_JOB"]) / REPORT).open("a") as out:
        out.write(json.dumps(line) + "\n")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


def outcomes(lines: str) -> dict[str, Outcome]:
    """Each test's outcome from the report's lines: the first failing or skipping phase decides."""
    folded: dict[str, Outcome] = {}
    for text in lines.splitlines():
        line = json.loads(text)
        nodeid, outcome = line["nodeid"], line["outcome"]
        if folded.get(nodeid, Outcome("passed")).result != "passed":
            continue
        if outcome == "failed":
            folded[nodeid] = Outcome("failed", line["detail"])
        elif outcome == "skipped":
            folded[nodeid] = Outcome("xfailed" if line["xfail"] else "skipped", line["detail"])
        elif line["when"] == "call":
            folded[nodeid] = Outcome("passed")
    return folded


def accounted(found: dict[str, Outcome], returncode: int | None, why: str) -> dict[str, Outcome]:
    """``found``, each test failed with ``why`` if pytest's exit status contradicts the outcomes.

    pytest exits 1 when a test failed and 0 when none did; any other status (an internal error, an
    interrupted session) means the outcomes are not the whole story. ``None``: the run never finished,
    and the tests without an outcome say so themselves.
    """
    failed = any(outcome.result == "failed" for outcome in found.values())
    if returncode is None or returncode == (1 if failed else 0):
        return found
    note = Outcome("failed", f"the guest's pytest exited {returncode}\n{why}")
    return {nodeid: outcome if outcome.result == "failed" else note for nodeid, outcome in found.items()}
