"""The deploy/ files: compose and Kubernetes manifests, Prometheus rules and the Grafana dashboard.

Static checks (valid YAML/JSON, every referenced file exists, names agree across files) plus
promtool's own config, rules and unit-test checks. Live evaluation of every expression
against a proxy is elsewhere; tests/promql.py lists the expressions for it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from promql import (  # tests/ is on sys.path (not a package)
    DASHBOARD,
    DEPLOY_DIR,
    all_promql_expressions,
    dashboard_expressions,
    dashboard_panels,
    rule_expressions,
    substitute_variables,
)

from proxy.config import parse_config
from proxy.metrics import Metrics

REPO = DEPLOY_DIR.parent
PROM_DIR = DEPLOY_DIR / "prometheus"
K8S_DIR = DEPLOY_DIR / "kubernetes"

# The metric contract (DESIGN.md) plus the extras the proxy exports; exposition names.
CONTRACT_METRICS = {
    "meterproxy_requests_total",
    "meterproxy_tokens_total",
    "meterproxy_cost_usd_total",
    "meterproxy_limit_rejections_total",
    "meterproxy_request_duration_seconds",
    "meterproxy_time_to_first_token_seconds",
    "meterproxy_overhead_seconds",
    "meterproxy_inflight_requests",
    "meterproxy_upstream_errors_total",
    "meterproxy_store_errors_total",
    "meterproxy_token_count_source_total",
    "meterproxy_budget_remaining_usd",
    "meterproxy_budget_limit_usd",
    "meterproxy_store_fallback_admissions_total",
    "meterproxy_unpriced_requests_total",
    "meterproxy_ledger_dropped_events_total",
    "meterproxy_shadow_rejections_total",
}
HISTOGRAMS = {
    "meterproxy_request_duration_seconds",
    "meterproxy_time_to_first_token_seconds",
    "meterproxy_overhead_seconds",
}
# Label names each metric has (histogram series add `le`); `instance` and `job` come from
# the scrape.
CONTRACT_LABELS = {
    "meterproxy_requests_total": {"provider", "model", "user", "team", "code"},
    "meterproxy_tokens_total": {"provider", "model", "user", "team", "type"},
    "meterproxy_cost_usd_total": {"provider", "model", "user", "team"},
    "meterproxy_limit_rejections_total": {"user", "team", "limit"},
    "meterproxy_shadow_rejections_total": {"user", "team", "limit"},
    "meterproxy_request_duration_seconds": {"provider", "model"},
    "meterproxy_time_to_first_token_seconds": {"provider", "model"},
    "meterproxy_overhead_seconds": {"provider"},
    "meterproxy_inflight_requests": {"provider"},
    "meterproxy_upstream_errors_total": {"provider", "kind"},
    "meterproxy_store_errors_total": {"op"},
    "meterproxy_token_count_source_total": {"source"},
    "meterproxy_budget_remaining_usd": {"subject", "period"},
    "meterproxy_budget_limit_usd": {"subject", "period"},
    "meterproxy_store_fallback_admissions_total": set(),
    "meterproxy_unpriced_requests_total": {"model"},
    "meterproxy_ledger_dropped_events_total": set(),
}
SCRAPE_LABELS = {"instance", "job"}
SEVERITIES = {"critical", "warning", "info"}
# PromQL words that look like metric names to the regex below.
PROMQL_WORDS = set(
    """sum by without on ignoring group_left group_right and or unless rate increase irate topk
    bottomk avg_over_time max min avg count scalar vector clamp_min clamp_max histogram_quantile
    day_of_month days_in_month hour minute absent offset bool time""".split()
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def recorded_names() -> set[str]:
    return {
        r["record"] for g in load_yaml(PROM_DIR / "recording.yml")["groups"] for r in g["rules"]
    }


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROM_DIR / "alerts.yml")["groups"] for r in g["rules"]]


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label names inside {} and by() are skipped)."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]?", w)}


def yaml_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in yaml_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in yaml_strings(v)]
    return []


def env_refs(text: str, with_default: bool = False) -> set[str]:
    """Names in ${VAR} references of a YAML config's values (comments are not read).

    Without with_default, only those with no `:-default`, which must be set.
    """
    found = set()
    for value in yaml_strings(yaml.safe_load(text)):
        for m in re.finditer(r"\$\{(\w+)(:-[^}]*)?\}", value):
            if with_default or m.group(2) is None:
                found.add(m.group(1))
    return found


def run_promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not installed: the Prometheus rules and their unit tests cannot be "
            "checked. Install it (Debian: apt-get install -y prometheus) and run again."
        )
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=50, check=False
    )


# ---------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_yaml(DEPLOY_DIR / "docker-compose.yml")
    assert isinstance(doc, dict)
    return doc


def test_compose_has_the_four_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"meterproxy", "redis", "prometheus", "grafana"}


def test_compose_build_context_and_dockerfile_exist(compose: dict[str, Any]) -> None:
    build = compose["services"]["meterproxy"]["build"]
    context = (DEPLOY_DIR / build["context"]).resolve()
    assert context == REPO
    assert (context / build.get("dockerfile", "Dockerfile")).is_file()


def test_every_compose_bind_mount_source_exists(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    binds = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                binds += 1
                assert (DEPLOY_DIR / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    assert binds >= 4


def test_compose_serves_the_mounted_config(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["meterproxy"]
    command = proxy["command"]
    config_path = command[command.index("--config") + 1]
    assert command[:1] == ["serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    assert mounts[config_path] == "./meterproxy.yaml"
    # Prometheus scrapes the port the proxy listens on.
    port = command[command.index("--port") + 1]
    targets = load_yaml(PROM_DIR / "prometheus.yml")["scrape_configs"][0]["static_configs"][0][
        "targets"
    ]
    assert targets == [f"meterproxy:{port}"]


def test_compose_passes_every_env_var_the_config_needs(compose: dict[str, Any]) -> None:
    text = (DEPLOY_DIR / "meterproxy.yaml").read_text(encoding="utf-8")
    needed = env_refs(text, with_default=True)
    assert {"METERPROXY_ADMIN_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"} <= needed
    assert needed <= set(compose["services"]["meterproxy"]["environment"])
    example = (DEPLOY_DIR / ".env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^(\w+)=", example, re.M))
    assert needed <= documented


def test_compose_mounts_match_prometheus_and_grafana_paths(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    grafana = compose["services"]["grafana"]
    provider = load_yaml(DEPLOY_DIR / "grafana/provisioning/dashboards/meterproxy.yml")
    folder = provider["providers"][0]["options"]["path"]
    dashboard_mounts = [
        v for v in grafana["volumes"] if v.startswith("./grafana/meterproxy-dashboard.json:")
    ]
    assert len(dashboard_mounts) == 1
    assert dashboard_mounts[0].split(":")[1].startswith(folder + "/")
    datasource = load_yaml(DEPLOY_DIR / "grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["environment"]
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"]


def test_compose_proxy_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (DEPLOY_DIR / "meterproxy.yaml").read_text(encoding="utf-8")
    for name in env_refs(text, with_default=True):
        monkeypatch.setenv(name, f"test-{name.lower()}")
    config = parse_config(text, "deploy/meterproxy.yaml")
    assert config.store == "redis://redis:6379/0"
    assert config.providers["openai"].api_key == "test-openai_api_key"
    assert config.providers["anthropic"].api_key == "test-anthropic_api_key"
    assert config.admin_key == "test-meterproxy_admin_key"
    assert any(team.usd_per_month for team in config.teams.values())
    assert len(config.plans) >= 2


# ---------------------------------------------------------------- kubernetes


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    objects = {}
    for resource in kustomization["resources"]:
        for doc in load_yaml_docs(K8S_DIR / resource):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_every_kubernetes_file_is_yaml_and_listed() -> None:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S_DIR / resource).is_file(), resource
    for path in K8S_DIR.glob("*.yaml"):
        docs = load_yaml_docs(path)
        assert docs, path
        if path.name not in ("kustomization.yaml", "secret.example.yaml"):
            assert path.name in kustomization["resources"], (
                f"{path.name} is not in kustomization.yaml"
            )
    # The example Secret would overwrite real keys on every apply.
    assert "secret.example.yaml" not in kustomization["resources"]


def test_kubernetes_deployment() -> None:
    objects = k8s_objects()
    deployment = objects[("Deployment", "meterproxy")]
    spec = deployment["spec"]
    pod = spec["template"]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "meterproxy:latest"
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["envFrom"] == [{"secretRef": {"name": "meterproxy-secrets"}}]
    # The config the args name is the ConfigMap's key, mounted where the args look.
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = objects[("ConfigMap", volume["configMap"]["name"])]
    assert config_path.name in configmap["data"]
    assert args[args.index("--port") + 1] == str(container["ports"][0]["containerPort"])


def test_kubernetes_service_and_redis_match() -> None:
    objects = k8s_objects()
    pod_labels = objects[("Deployment", "meterproxy")]["spec"]["template"]["metadata"]["labels"]
    service = objects[("Service", "meterproxy")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    redis_service = objects[("Service", "meterproxy-redis")]
    redis = objects[("StatefulSet", "meterproxy-redis")]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_labels.items()
    # The proxy Service must not select the Redis pods, nor the other way round.
    assert not service["spec"]["selector"].items() <= redis_labels.items()
    assert not redis_service["spec"]["selector"].items() <= pod_labels.items()
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    config = yaml.safe_load(objects[("ConfigMap", "meterproxy-config")]["data"]["config.yaml"])
    port = redis_service["spec"]["ports"][0]["port"]
    assert config["store"].startswith(f"redis://meterproxy-redis:{port}/")


def test_kubernetes_config_is_valid_with_the_secret_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    text = k8s_objects()[("ConfigMap", "meterproxy-config")]["data"]["config.yaml"]
    secret = load_yaml(K8S_DIR / "secret.example.yaml")
    assert secret["metadata"]["name"] == "meterproxy-secrets"
    # Every variable the config needs comes from the Secret.
    assert env_refs(text) <= set(secret["stringData"])
    for name, value in secret["stringData"].items():
        monkeypatch.setenv(name, value)
    config = parse_config(text, "deploy/kubernetes/configmap.yaml")
    assert config.listen.host == "0.0.0.0"
    assert config.store.startswith("redis://")


# ---------------------------------------------------------------- grafana


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def test_dashboard_uses_a_datasource_variable(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("team", "user", "model", "provider"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["allValue"] == ".*"


def test_every_dashboard_panel_has_promql_on_the_variable_datasource(
    dashboard: dict[str, Any],
) -> None:
    panels = dashboard_panels(dashboard)
    assert len(panels) >= 20
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_covers_what_ops_asked_for(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(e for _, e in dashboard_expressions())
    for needed in (
        "topk(",
        "day_of_month()",
        "days_in_month()",
        "histogram_quantile(0.99",
        'type="cached_input"',
        "meterproxy_limit_rejections_total",
        "provider:meterproxy_upstream_errors:ratio_rate5m",
        "meterproxy_time_to_first_token_seconds",
        "meterproxy_overhead_seconds",
        "meterproxy_inflight_requests",
        "subject_period:meterproxy_budget_limit_usd:max",
        "subject_period:meterproxy_budget_forecast_usd:linear",
    ):
        assert needed in exprs, needed


def test_dashboard_and_rules_select_only_known_metrics() -> None:
    """A typo in a metric name gives an empty panel or an alert that never fires."""
    known = recorded_names() | {"up"}
    for name in CONTRACT_METRICS:
        known.add(name)
        if name in HISTOGRAMS:
            known |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    for where, expr in all_promql_expressions():
        unknown = metric_names(expr) - known
        assert not unknown, f"{where}: unknown metric(s) {sorted(unknown)} in {expr}"


def test_the_proxy_exports_the_metrics_and_labels_the_deploy_files_assume() -> None:
    """CONTRACT_LABELS above is what the rules and the dashboard are checked against."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    wrappers = {
        next(iter(m.describe())).name: m
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    for name, labels in CONTRACT_LABELS.items():
        family = name.removesuffix("_total")
        assert family in wrappers, f"the proxy does not define {name}"
        if labels:
            wrappers[family].labels(**{label: "x" for label in labels})
    exposed: dict[str, set[str]] = {}
    for exposed_family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in exposed_family.samples:
            exposed[sample.name] = set(sample.labels) - {"le"}
    for name, labels in CONTRACT_LABELS.items():
        sample_name = f"{name}_count" if name in HISTOGRAMS else name
        got = exposed.get(sample_name)
        assert got == labels, f"{sample_name}: {got} != {labels}"


def test_label_matchers_use_labels_the_metrics_have() -> None:
    for where, expr in all_promql_expressions():
        for metric, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            if base not in CONTRACT_LABELS:
                continue
            allowed = (
                CONTRACT_LABELS[base] | SCRAPE_LABELS | ({"le"} if base in HISTOGRAMS else set())
            )
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", strip_strings(matchers)))
            assert used <= allowed, f"{where}: {metric} has no label(s) {sorted(used - allowed)}"


def test_every_recording_rule_is_read_by_the_dashboard_or_an_alert() -> None:
    readers = " ".join(e for w, e in all_promql_expressions() if ":record:" not in w)
    # Rules that only feed other rules count as read through them.
    rule_bodies = " ".join(e for w, e in rule_expressions() if ":record:" in w)
    for name in recorded_names():
        assert name in readers or name in rule_bodies, f"{name} is recorded but never read"
        assert re.search(
            r"(?<![\w:])" + re.escape(name) + r"(?![\w:])", readers + " " + rule_bodies
        )
    dashboard_text = " ".join(e for w, e in dashboard_expressions())
    # The heavy rate panels read recorded series rather than the raw counters.
    for name in (
        "team_model:meterproxy_cost_usd:rate5m",
        "team_user:meterproxy_cost_usd:rate5m",
        "team_model_type:meterproxy_tokens:rate5m",
        "team_model_code:meterproxy_requests:rate5m",
        "provider_model_le:meterproxy_request_duration_seconds_bucket:rate5m",
    ):
        assert name in dashboard_text, name


def test_dashboard_expressions_have_every_variable_substituted() -> None:
    exprs = dashboard_expressions()
    assert len(exprs) >= 30
    for where, expr in exprs:
        assert "$" not in expr, f"{where}: {expr}"
    assert substitute_variables('x{a=~"$team", b=~"${user:regex}"}[$__rate_interval]') == (
        'x{a=~".*", b=~".*"}[1m]'
    )


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool only parses rule files: wrap each dashboard expression in a recording rule."""
    rules = [
        {"record": f"dashboard:expression_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_expressions())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_files_are_valid_yaml() -> None:
    datasource = load_yaml(DEPLOY_DIR / "grafana/provisioning/datasources/prometheus.yml")
    assert datasource["apiVersion"] == 1
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = load_yaml(DEPLOY_DIR / "grafana/provisioning/dashboards/meterproxy.yml")
    assert provider["providers"][0]["type"] == "file"


# ---------------------------------------------------------------- prometheus


def test_alerts_have_severity_summary_description_and_runbook() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "MeterproxyTeamBudget80Percent",
        "MeterproxyTeamBudgetExhausted",
        "MeterproxySpendRateAnomaly",
        "MeterproxyRejectionSpike",
        "MeterproxyUpstreamErrorRate",
        "MeterproxyStoreErrors",
        "MeterproxyFailOpenAdmissions",
        "MeterproxyDown",
    } <= names
    readme = (DEPLOY_DIR / "README.md").read_text(encoding="utf-8").lower()
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip()
        assert "Runbook:" in annotations["description"], rule["alert"]
        anchor = annotations["runbook_url"].split("#", 1)[1]
        assert f"### {rule['alert'].lower()}" in readme, (
            f"README has no section for {rule['alert']}"
        )
        assert anchor == rule["alert"].lower()


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = load_yaml(PROM_DIR / "alerts_test.yml")
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a not-firing test"
    # Recording groups evaluate before alert groups, or the tests flake (see the file header).
    groups = [
        g["name"]
        for f in ("recording.yml", "alerts.yml")
        for g in load_yaml(PROM_DIR / f)["groups"]
    ]
    assert tests["group_eval_order"] == groups


def test_promtool_check_config() -> None:
    result = run_promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = load_yaml(PROM_DIR / "prometheus.yml")
    assert config["rule_files"] == ["recording.yml", "alerts.yml"]
    job = config["scrape_configs"][0]
    assert job["job_name"] == "meterproxy"
    assert job["scrape_interval"] == "15s"


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", "recording.yml", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    result = run_promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promql_helper_lists_rules_and_dashboard() -> None:
    exprs = all_promql_expressions()
    wheres = [w for w, _ in exprs]
    assert len(wheres) == len(set(wheres))
    assert sum(":record:" in w for w in wheres) == sum(
        len(g["rules"]) for g in load_yaml(PROM_DIR / "recording.yml")["groups"]
    )
    assert sum(":alert:" in w for w in wheres) == len(alert_rules())
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert sum(w.startswith("dashboard:") for w in wheres) == sum(
        len(p["targets"]) for p in dashboard_panels(dashboard)
    )
