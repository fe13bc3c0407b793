"""docker-compose.yml, the Prometheus config and the Grafana dashboard agree with the code.

Pure file checks (no Docker engine needed): services and images, loopback-only published ports, the
workers' bootstrap = Kafka's in-network advertised listener, metrics ports = MetricsSettings defaults =
Prometheus targets, every worker command parses with the real CLI, every dashboard metric is exported by
WorkerMetrics, every ADSTREAM_* variable names a real setting.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from core.metrics import WorkerMetrics
from core.settings import KafkaSettings, MetricsSettings, Settings, TopicNames, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "adstream.json"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

ADSTREAM_SERVICES = ("kafka-init", "joiner", "feature-updater", "trainer", "serve")
# worker service -> MetricsSettings field holding its /metrics port (and the flag that sets it)
WORKER_PORT_FIELD = {"joiner": "joiner_port", "feature-updater": "feature_updater_port",
                     "trainer": "trainer_port", "serve": "serve_port"}
PORT_FLAG = {"serve": "--port"}  # the service answers /metrics on its own HTTP port


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def command_args(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert cmd, "service has no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {str(k): str(v) for k, v in env.items()}


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def non_loopback_ports(service: dict[str, Any]) -> list[str]:
    """Published ports of a service not bound to 127.0.0.1 (short and long syntax)."""
    bad = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            if "published" in p and p.get("host_ip") != "127.0.0.1":
                bad.append(str(p))
        else:
            parts = str(p).split(":")
            if len(parts) != 3 or parts[0] != "127.0.0.1":
                bad.append(str(p))
    return bad


def advertised_listeners(kafka: dict[str, Any]) -> dict[str, str]:
    """``KAFKA_ADVERTISED_LISTENERS`` as {listener name: host:port}."""
    raw = env_of(kafka)["KAFKA_ADVERTISED_LISTENERS"]
    out = {}
    for item in raw.split(","):
        name, addr = item.strip().split("://", 1)
        out[name] = addr
    return out


def metric_series_names() -> set[str]:
    """Every series name the workers, the trainer and the service export, with the suffixes
    Prometheus adds."""
    from online.metrics import ServeMetrics
    from streams.trainer import TrainerMetrics

    registries = [WorkerMetrics("test", registry=CollectorRegistry()).registry, TrainerMetrics().registry,
                  ServeMetrics(registry=CollectorRegistry()).registry]
    names: set[str] = set()
    for family in (f for r in registries for f in r.collect()):
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
        else:
            names.add(family.name)
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]


def settings_field_exists(var: str) -> bool:
    """Whether ``ADSTREAM_A__B`` names a real (nested) field of Settings."""
    model: Any = Settings
    for part in var.removeprefix("ADSTREAM_").lower().split("__"):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return True


# --------------------------------------------------------------------------- services and images


def test_expected_services_and_images(services: dict[str, Any]) -> None:
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["redis"]["image"] == "redis:7"
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    for name in ADSTREAM_SERVICES:
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
        assert services[name]["image"].startswith("adstream"), name


def test_dockerfile_installs_like_make_install() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert "-c requirements/constraints.txt -r requirements/base.txt" in text
    assert re.search(r"pip install --no-deps -c requirements/constraints.txt torchrec", text)
    assert "pip install --no-deps -e ." in text
    for src in re.findall(r"^COPY (\S+)/ ", text, re.M):  # copied package folders exist
        assert (ROOT / src).is_dir(), src


def test_kafka_is_single_node_kraft(services: dict[str, Any]) -> None:
    env = env_of(services["kafka"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:9093"
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert len(env["CLUSTER_ID"]) == 22  # base64 of a UUID, as kafka-storage.sh random-uuid prints
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", key


# --------------------------------------------------------------------------- network exposure


def test_every_published_port_is_loopback(services: dict[str, Any]) -> None:
    bad = {name: non_loopback_ports(s) for name, s in services.items() if non_loopback_ports(s)}
    assert not bad, f"ports published beyond 127.0.0.1: {bad}"


@pytest.mark.parametrize("ports,bad", [
    (["127.0.0.1:9090:9090"], []),
    (["9090:9090"], ["9090:9090"]),
    (["0.0.0.0:3000:3000"], ["0.0.0.0:3000:3000"]),
    ([{"target": 80, "published": 8080}], ["{'target': 80, 'published': 8080}"]),
    ([{"target": 80, "published": 8080, "host_ip": "127.0.0.1"}], []),
])
def test_port_check_catches_wildcard_binds(ports: list[Any], bad: list[str]) -> None:
    assert non_loopback_ports({"ports": ports}) == bad


def test_containers_bind_metrics_on_all_interfaces(services: dict[str, Any]) -> None:
    assert MetricsSettings().host == "127.0.0.1"  # developer machines stay on loopback
    for name in WORKER_PORT_FIELD:
        assert env_of(services[name]).get("ADSTREAM_METRICS__HOST") == "0.0.0.0", name


# --------------------------------------------------------------------------- bootstrap and topics


def test_bootstrap_matches_kafka_advertised_listener(services: dict[str, Any]) -> None:
    listeners = advertised_listeners(services["kafka"])
    in_network = [addr for addr in listeners.values() if addr.split(":")[0] == "kafka"]
    assert len(in_network) == 1, listeners
    bootstrap = in_network[0]
    for name in ADSTREAM_SERVICES:
        args = command_args(services[name])
        assert option(args, "--bootstrap") == bootstrap, name
        assert env_of(services[name]).get("ADSTREAM_KAFKA__BOOTSTRAP") == bootstrap, name
    # anything reachable from the host goes through a loopback-advertised listener
    published = {str(p).split(":")[1] for p in services["kafka"].get("ports") or []}
    for addr in listeners.values():
        host, port = addr.rsplit(":", 1)
        if port in published:
            assert host == "127.0.0.1", addr


def test_topics_and_partitions_match_settings(services: dict[str, Any]) -> None:
    args = command_args(services["kafka-init"])
    assert args[-4:-2] == ["topics", "create"]
    partitions = int(option(args, "--partitions"))
    assert partitions == KafkaSettings().partitions
    defaults = TopicNames().model_dump()
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            if key == "ADSTREAM_KAFKA__PARTITIONS":
                assert int(value) == partitions, name
            if key.startswith("ADSTREAM_KAFKA__TOPICS__"):
                field = key.removeprefix("ADSTREAM_KAFKA__TOPICS__").lower()
                assert defaults.get(field) == value, f"{name}: {key}={value}"


def test_adstream_env_names_real_settings(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ADSTREAM_SERVICES:
        env = {k: v for k, v in env_of(services[name]).items() if k.startswith("ADSTREAM_")}
        assert env, name
        unknown = [k for k in env if not settings_field_exists(k)]
        assert not unknown, f"{name}: no such setting {unknown}"
        for k in list(os.environ):
            if k.startswith("ADSTREAM_"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s = load_settings()  # values validate
        assert s.kafka.bootstrap == env["ADSTREAM_KAFKA__BOOTSTRAP"]
        assert s.features.online_store == "redis" and s.features.redis_url == "redis:6379"


def test_settings_env_check_rejects_typos() -> None:
    assert settings_field_exists("ADSTREAM_KAFKA__BOOTSTRAP")
    assert not settings_field_exists("ADSTREAM_KAFKA__BOOTSTRAPS")
    assert not settings_field_exists("ADSTREAM_METRIC__HOST")


# --------------------------------------------------------------------------- commands and metrics ports


def test_worker_commands_parse_with_the_real_cli(services: dict[str, Any]) -> None:
    from adstream.cli import build_parser

    for name in ADSTREAM_SERVICES:
        args = command_args(services[name])
        try:
            ns = build_parser().parse_args(args)
        except SystemExit as e:  # argparse's way of saying no
            pytest.fail(f"{name}: `adstream {' '.join(args)}` is rejected by the CLI (exit {e.code})")
        assert callable(getattr(ns, "func", None)), name


def test_cli_check_rejects_unknown_flags() -> None:
    from adstream.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["joiner", "--no-such-flag", "1"])


def test_metrics_ports_equal_settings_and_prometheus_targets(services: dict[str, Any]) -> None:
    defaults = MetricsSettings()
    expected = set()
    for name, field in WORKER_PORT_FIELD.items():
        port = int(option(command_args(services[name]), PORT_FLAG.get(name, "--metrics-port")))
        assert port == getattr(defaults, field), name
        expected.add(f"{name}:{port}")
    prom = load_yaml(PROMETHEUS)
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == expected


def test_trainer_and_service_share_the_model_registry(services: dict[str, Any]) -> None:
    from core.settings import ServeSettings, TrainerSettings

    def mount(svc: str, path: Path) -> str:
        for v in services[svc].get("volumes") or []:
            src, dst = str(v).split(":")[:2]
            if dst == f"/app/{path}":
                return src
        raise AssertionError(f"{svc} does not mount /app/{path}")

    assert TrainerSettings().registry_dir == ServeSettings().registry_dir
    assert mount("trainer", TrainerSettings().registry_dir) == mount("serve", ServeSettings().registry_dir)
    # the service's admin calls (rollback, promote) write LATEST: its mount must not be read-only
    serve_mounts = [str(v) for v in services["serve"].get("volumes") or []
                    if str(v).split(":")[1] == f"/app/{ServeSettings().registry_dir}"]
    assert serve_mounts and not any(v.split(":")[2:] and "ro" in v.split(":")[2].split(",")
                                    for v in serve_mounts), serve_mounts


def test_prometheus_and_grafana_files_are_mounted(services: dict[str, Any]) -> None:
    def mounts(svc: dict[str, Any]) -> dict[str, Path]:
        out = {}
        for v in svc.get("volumes") or []:
            src, dst = str(v).split(":")[:2]
            if src.startswith("."):
                out[dst] = (ROOT / src).resolve()
        return out

    prom = mounts(services["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    graf = mounts(services["grafana"])
    assert GRAFANA_DATASOURCE.is_relative_to(graf["/etc/grafana/provisioning"])
    assert GRAFANA_PROVIDER.is_relative_to(graf["/etc/grafana/provisioning"])
    provider_path = load_yaml(GRAFANA_PROVIDER)["providers"][0]["options"]["path"]
    assert graf[provider_path] == DASHBOARD.parent


# --------------------------------------------------------------------------- Grafana


def test_dashboard_uses_the_provisioned_datasource() -> None:
    ds = load_yaml(GRAFANA_DATASOURCE)["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]


def test_dashboard_metrics_exist_in_worker_metrics() -> None:
    known = metric_series_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 7
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\badstream_[a-z0-9_]+", expr))
        assert names, f"no adstream metric in {expr!r}"
        unknown = names - known
        assert not unknown, f"{expr!r} uses metrics no worker defines: {unknown}"
        used |= names
    for core_metric in ("adstream_records_in_total", "adstream_dead_letters_total",
                        "adstream_join_outcomes_total", "adstream_consumer_lag",
                        "adstream_processing_latency_seconds_bucket",
                        "adstream_feature_freshness_seconds_bucket", "adstream_features_written_total",
                        "adstream_serve_stage_latency_seconds_bucket", "adstream_serve_requests_total",
                        "adstream_trainer_window_auc", "adstream_serve_model_age_seconds"):
        assert core_metric in used, core_metric


def test_metric_name_check_knows_suffixes() -> None:
    known = metric_series_names()
    assert "adstream_records_in_total" in known and "adstream_records_in" not in known
    assert "adstream_processing_latency_seconds_bucket" in known
    assert "adstream_consumer_lag" in known and "adstream_consumer_lag_total" not in known
