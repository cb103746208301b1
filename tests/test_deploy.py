"""Tests that the deployment files match the code: metric names, settings, ports, grace periods.

`make check-deploy` validates each file against its tool's schema; these
tests catch drift between those files and the service.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
import yaml

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.config import Settings
from sia.rpc.server import SERVICE_NAME
from tests.helpers import TEST_SIZE

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
MONITORING = ROOT / "monitoring"

#: Series Prometheus makes itself, not the service.
PROMETHEUS_SERIES = {"up"}
#: Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"instance", "job", "le"}
#: Metrics that must have samples after a few calls, not just a declaration.
CORE_SERIES = {
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_handling_seconds_bucket",
    "grpc_server_handling_seconds_count",
    "grpc_server_in_flight_requests",
    "sia_images_generated_total",
    "sia_upstream_request_seconds_bucket",
    "sia_tasks",
    "sia_build_info",
}
#: What follows a metric's TYPE line name in PromQL, by type.
SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
}
PROMQL_WORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip


def load_yaml(path: Path) -> list[dict[str, Any]]:
    """Every document of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    """The Kubernetes object of that kind and name under k8s/."""
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml(path):
            if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == name:
                return doc
    raise AssertionError(f"no {kind} {name} under k8s/")


def setting_names() -> set[str]:
    """Every environment variable the service reads."""
    return {name.upper() for name in Settings.model_fields}


def alert_exprs() -> list[str]:
    """The PromQL of every rule in monitoring/alerts.yml."""
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel target and query variable of the Grafana dashboard."""
    dashboard = json.loads((MONITORING / "grafana" / "sia.json").read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        found = re.fullmatch(r"label_values\((.*),\s*\w+\)", query or "")
        if found:
            exprs.append(found.group(1))
    return exprs


def promql_selectors(expr: str) -> tuple[set[str], dict[str, set[str]]]:
    """The metric names an expression reads, and the label names each selector matches on."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    labels: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        labels.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = {
        word
        for word in re.findall(r"(?<![\w$.:])([A-Za-z_:][\w:]*+)(?!\s*\()", bare)
        if word not in PROMQL_WORDS
    }
    return names, labels


def exported_series(text: str) -> dict[str, str]:
    """Each series name a scrape declares (histograms as _bucket, _sum, _count), with its family."""
    series: dict[str, str] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        for suffix in SUFFIXES[kind]:
            series[name + suffix] = name
    return series


def sampled_labels(text: str) -> dict[str, set[str]]:
    """For each series with samples in a scrape, the label names its samples carry."""
    found: dict[str, set[str]] = {}
    for name, labels in re.findall(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? \S+$", text, re.MULTILINE):
        found.setdefault(name, set()).update(re.findall(r'(\w+)="', labels))
    return found


async def scrape_after_calls(app: App, stub: pb_grpc.ImageServiceStub) -> str:
    """Make one of each kind of call, finish an async task, then scrape /metrics."""
    await stub.GenerateImage(pb.GenerateImageRequest(prompt="a fox", size=TEST_SIZE), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GenerateImage(pb.GenerateImageRequest(prompt=""), timeout=30)
    submitted = await stub.GenerateImageAsync(
        pb.GenerateImageRequest(prompt="a lighthouse", size=TEST_SIZE), timeout=30
    )
    async with asyncio.timeout(30):
        while True:
            task = await stub.GetImageTask(pb.GetImageTaskRequest(task_id=submitted.task_id))
            if task.status not in (pb.TASK_STATUS_QUEUED, pb.TASK_STATUS_RUNNING):
                break
            await asyncio.sleep(0.05)
    assert task.status == pb.TASK_STATUS_SUCCEEDED
    url = f"http://127.0.0.1:{app.http_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_alerts_and_dashboard_use_only_exported_metrics(
    app: App, stub: pb_grpc.ImageServiceStub
) -> None:
    """Every metric and label the alert rules and dashboard query is one a live /metrics exports."""
    text = await scrape_after_calls(app, stub)
    declared = exported_series(text)
    sampled = sampled_labels(text)
    assert set(sampled) >= CORE_SERIES, f"no samples of {sorted(CORE_SERIES - set(sampled))}"
    assert sampled["grpc_server_handled_total"] >= {"grpc_method", "grpc_code", "grpc_service"}

    used: dict[str, set[str]] = {}
    for where, exprs in (("alerts.yml", alert_exprs()), ("sia.json", dashboard_exprs())):
        assert exprs, f"no PromQL found in {where}"
        for expr in exprs:
            names, labels = promql_selectors(expr)
            unknown = names - set(declared) - PROMETHEUS_SERIES
            assert not unknown, f"{where} queries {sorted(unknown)}, not exported: {expr}"
            for name in names:
                used.setdefault(name, set()).update(labels.get(name, set()))

    for name, labels in used.items():
        if name in PROMETHEUS_SERIES or name not in sampled:
            continue  # declared with labels but no samples yet: nothing to compare against
        known = set().union(*(v for k, v in sampled.items() if declared.get(k) == declared[name]))
        assert labels <= known | TARGET_LABELS, f"{name} has no labels {sorted(labels - known)}"
    # Together the alerts and the dashboard watch every family the service is judged by.
    assert {declared[name] for name in used if name in declared} >= {
        "grpc_server_handled_total",
        "grpc_server_handling_seconds",
        "sia_images_generated_total",
        "sia_upstream_errors_total",
        "sia_tasks",
        "sia_task_queue_depth",
        "sia_task_oldest_queued_seconds",
        "sia_task_outcomes_total",
    }


def test_promql_selector_parsing() -> None:
    """The PromQL scan finds metric names and matcher labels, not functions, labels or variables."""
    names, labels = promql_selectors(
        'histogram_quantile(0.99, sum by (grpc_method, le) (rate(x_bucket{a="1", b=~"$v|y"}'
        "[$__rate_interval]))) / on (job) group_left (le) max without (c) (y) > bool 0.5"
    )
    assert names == {"x_bucket", "y"}
    assert labels == {"x_bucket": {"a", "b"}}


def promtool() -> str | None:
    """promtool on PATH or beside this interpreter (where `make deploy-tools` puts it)."""
    beside = Path(sys.executable).parent / "promtool"
    return shutil.which("promtool") or (str(beside) if os.access(beside, os.X_OK) else None)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query once Grafana's variables are filled in."""
    tool = promtool()
    if tool is None:
        pytest.skip("promtool is not installed (make deploy-tools installs it)")
    rules = [
        {
            "record": f"sia:dashboard_query_{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_panels_have_unique_ids_and_the_datasource_variable() -> None:
    """Grafana needs unique panel ids; every query goes through the ${datasource} variable."""
    dashboard = json.loads((MONITORING / "grafana" / "sia.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_kustomization_lists_every_manifest() -> None:
    """kustomization.yaml names exactly the manifests in k8s/."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_termination_grace_covers_the_shutdown() -> None:
    """Kubernetes waits longer than the preStop pause plus SHUTDOWN_GRACE before SIGKILL."""
    config = k8s_object("ConfigMap", "sia-config")["data"]
    pod = k8s_object("Deployment", "sia")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + float(config["SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] >= drain + 5


def test_config_and_secret_set_only_real_settings() -> None:
    """Every variable the ConfigMap and Secret set is a setting of the service."""
    config = k8s_object("ConfigMap", "sia-config")["data"]
    secret = k8s_object("Secret", "sia-secrets")["stringData"]
    assert set(config) | set(secret) <= setting_names()
    assert "IMAGE_API_KEY" in secret
    assert config["TASK_BACKEND"] == "redis"
    values = {**config, **secret, "IMAGE_API_KEY": "sk-test"}
    Settings(_env_file=None, **{k.lower(): v for k, v in values.items()})  # type: ignore[call-arg]


def test_deployment_probes_ports_and_hardening() -> None:
    """Probes use grpc.health.v1 on the gRPC port; the pod runs hardened with writable volumes."""
    deployment = k8s_object("Deployment", "sia")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert ports == {"grpc": defaults.grpc_port, "http": defaults.http_port}
    assert container["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": SERVICE_NAME}
    assert container["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": ""}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert k8s_object("ConfigMap", "sia-config")["data"]["DATA_DIR"] in mounts
    assert set(container["resources"]) == {"requests", "limits"}


def test_services_hpa_and_pdb_select_the_deployment() -> None:
    """The Services, HPA and PDB point at the Deployment's pods and ports."""
    deployment = k8s_object("Deployment", "sia")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name in ("sia", "sia-headless"):
        service = k8s_object("Service", name)["spec"]
        assert service["selector"].items() <= pod_labels.items()
        assert {p["name"]: p["appProtocol"] for p in service["ports"]} == {
            "grpc": "kubernetes.io/h2c",
            "http": "http",
        }
    pdb = k8s_object("PodDisruptionBudget", "sia")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = k8s_object("HorizontalPodAutoscaler", "sia")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "sia"
    assert hpa["minReplicas"] >= 2
    assert pdb["minAvailable"] < hpa["minReplicas"]


def dockerfile_runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    instructions = [tuple(line.split(None, 1)) for line in lines]
    last = max(i for i, (op, _) in enumerate(instructions) if op.upper() == "FROM")
    return [(op.upper(), args) for op, args in instructions[last:]]  # type: ignore[misc]


def test_dockerfile_exposes_the_ports_and_runs_as_pid_1_without_root() -> None:
    """The image exposes 8080 and 9090, runs as a non-root user and receives SIGTERM itself."""
    stage = dict(dockerfile_runtime_stage())
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert set(stage["EXPOSE"].split()) == {str(defaults.grpc_port), str(defaults.http_port)}
    assert stage["USER"].split(":")[0] not in ("0", "root")
    assert json.loads(stage["ENTRYPOINT"]) == ["sia"]
    assert json.loads(stage["CMD"]) == ["serve"]
    assert stage["STOPSIGNAL"] == "SIGTERM"
    assert "/health" in stage["HEALTHCHECK"]


def test_compose_file_matches_the_service() -> None:
    """Compose runs sia-server from .env with a stop grace above SHUTDOWN_GRACE and real mounts."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    server, second = services["sia-server"], services["sia-server-2"]
    assert server["env_file"] == ".env"
    assert second["profiles"] == ["replicas"]
    assert set(server["environment"]) <= setting_names()
    assert server["environment"]["TASK_BACKEND"] == "redis"
    grace = float(Settings(_env_file=None).shutdown_grace)  # type: ignore[call-arg]
    assert float(server["stop_grace_period"].removesuffix("s")) > grace
    assert (ROOT / server["build"] / "Dockerfile").is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"docker-compose.yml mounts missing {source}"
