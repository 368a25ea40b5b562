from __future__ import annotations

import re
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from authd.metrics import registry_for, render
from tests.fakes.ca import TestCA as FakeCA
from tests.fakes.daemonview import build

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "authd-rules.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "authd-rules.test.yml"


def scrape() -> str:
    view, _ = build(FakeCA.create("example.org"))
    return render(registry_for(view))[0].decode()


def test_rules_are_valid_and_their_unit_tests_pass(promtool: str) -> None:
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_rules_read_only_metrics_authd_exports() -> None:
    exported = {s.name for family in text_string_to_metric_families(scrape()) for s in family.samples}
    used = set(re.findall(r"\b(authd_[a-z_]+)", RULES.read_text()))
    assert used, "the rules name no metric"
    assert used <= exported, used - exported


def test_a_scrape_passes_promtools_metric_lint(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrape(), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
