from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_alert_rules import scrape

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "authd-dashboard.json"
# Grafana's variables, as Grafana would fill them in, so that promtool can parse the expressions.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*", "$job": ".*"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_dashboard_reads_only_metrics_authd_exports() -> None:
    exported = {s.name for family in text_string_to_metric_families(scrape()) for s in family.samples}
    used = {name for expr in expressions() for name in re.findall(r"\b((?:authd|process)_[a-z_]+)", expr)}
    assert "authd_datapath_verdicts_total" in used
    assert used <= exported, used - exported


def test_every_panel_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel's expression, with Grafana's variables filled in, as a recording rule promtool checks."""
    rules = []
    for index, panel in enumerate(dashboard()["panels"]):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, expr
            rules.append({"record": f"dashboard:panel{index}:{target['refId']}", "expr": expr})
    path = tmp_path / "panels.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_panels_have_unique_ids_and_use_the_datasource_variable() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
