"""Every PromQL expression the deploy files ship: dashboard targets and rule expressions.

Used by tests/test_deploy.py (syntax checks) and by live tests that evaluate each expression
against a Prometheus scraping a real proxy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY_DIR / "grafana" / "meterproxy-dashboard.json"
RULE_FILES = (DEPLOY_DIR / "prometheus" / "recording.yml", DEPLOY_DIR / "prometheus" / "alerts.yml")

# Grafana's built-in interval variables, replaced by values that suit a short test with a fast
# scrape; template variables (team, user, ...) become `.*`, which matches every label value
# (the empty one too) in the `=~` matchers the dashboard puts them in.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute_variables(expr: str, values: dict[str, str] | None = None) -> str:
    """Expand Grafana variables (`$x`, `${x}`, `${x:regex}`) in a dashboard expression."""
    chosen = {**BUILTIN_VARIABLES, **(values or {})}

    def repl(m: re.Match[str]) -> str:
        return chosen.get(m.group(1) or m.group(2), ".*")

    return _VARIABLE.sub(repl, expr)


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data, including panels nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_expressions(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(where, expr) per dashboard target; where is `dashboard:<panel title>:<refId>`."""
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                where = f"dashboard:{panel.get('title', '?')}:{target.get('refId', '?')}"
                out.append((where, substitute_variables(target["expr"])))
    return out


def rule_expressions(paths: tuple[Path, ...] = RULE_FILES) -> list[tuple[str, str]]:
    """(where, expr) per rule; where is `<file>:record:<name>` or `<file>:alert:<name>`.

    A recording rule's expression should return data whenever its inputs exist; an alert's
    expression returns data only while the alert's condition holds.
    """
    out = []
    for path in paths:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in doc["groups"]:
            for rule in group["rules"]:
                kind = "record" if "record" in rule else "alert"
                name = rule[kind]
                if kind == "record" and rule.get("labels"):
                    name += "{" + ",".join(f'{k}="{v}"' for k, v in rule["labels"].items()) + "}"
                out.append((f"{path.name}:{kind}:{name}", rule["expr"].strip()))
    return out


def all_promql_expressions() -> list[tuple[str, str]]:
    """Every PromQL expression shipped under deploy/, dashboard first, then the rules."""
    return dashboard_expressions() + rule_expressions()
