"""One stack, four formats: the orchestrator, compose, swarm and Kubernetes must agree.

`orchestrate.stack.describe_stack()` is the reference. Each format is rendered by its own tool
(`docker-compose config`, `docker stack config`, `kubectl kustomize`) with default settings and
reduced to the same per-service view; changing one format without the others fails here.
Differences that a format forces are spelled out where that format is read.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from orchestrate.secretfiles import STAGE_ROOT
from orchestrate.stack import (
    DEFAULT_MONITORING_PORT,
    DEFAULT_PROJECT,
    DNS_OPTIONS,
    ETCD_MEMBERS,
    IMAGES,
    MAX_REPLICAS,
    PATRONI_MEMBERS,
    PROJECT_LABEL,
    PROXY_TLS_SETTING,
    REDIS_PORT,
    REDIS_SERVERS,
    SECRETS_DIR,
    SECRETS_TARGET_DIR,
    SENTINEL_PORT,
    SENTINELS,
    SERVICE_LABEL,
    HealthCheck,
    Service,
    Stack,
    describe_stack,
)
from service import probe
from service.process.factory import MAX_BODY_BYTES
from tests.support import REPO, run

from .helpers import tool

STACK = describe_stack()
SERVICES = [s.name for s in STACK.services]
MONITORED = describe_stack(monitoring_port=DEFAULT_MONITORING_PORT)  # `up --monitoring`
TLS = describe_stack(tls=True)  # `up --tls`
HA = describe_stack(ha=True)  # `up --ha`
# The Redis servers and Sentinels of `up --ha`, which take the place of the one Redis.
HA_REDIS = [s.name for s in HA.services if s.image == "redis"]
# What `up --ha` changes: the database's services, and the URLs of those that reach it.
HA_SERVICES = [s.name for s in HA.services if s.name not in SERVICES or s != STACK.service(s.name)]
# Kubernetes has its own proxy: the Service object balances over the pods that are ready.
K8S_SERVICES = [name for name in SERVICES if name != "proxy"]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "ki": 2**10, "mi": 2**20, "gi": 2**30}

View = dict[str, Any]


def default_env() -> dict[str, str]:
    """The environment without any setting that would change the rendered defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CACHESTACK_", "COMPOSE_"))}


def render(*cmd: str) -> dict[str, Any]:
    result = subprocess.run(
        cmd,
        cwd=REPO,
        env=default_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def to_bytes(size: str | int) -> int:
    match = re.fullmatch(r"(\d+)([a-z]*)", str(size).lower())
    assert match, size
    return int(match[1]) * UNITS[match[2]]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", value)
    assert match, value
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def unescape(value: Any) -> Any:
    """docker-compose 1.29 `config` keeps `$$` (a literal `$`) escaped."""
    if isinstance(value, str):
        return value.replace("$$", "$")
    if isinstance(value, list):
        return [unescape(v) for v in value]
    return value


def probe_default_path() -> str:
    """The path `python -m service.probe` checks without arguments (read from its code)."""
    with mock.patch.object(probe.urllib.request, "urlopen", side_effect=OSError) as urlopen:
        probe.main([])
    return "/" + urlopen.call_args.args[0].split("/", 3)[3]


def expected(service: Service) -> View:
    """The reference view of one service, from the orchestrator's stack description."""
    spec = IMAGES[service.image]
    return {
        "image": spec.repository,
        "user": service.user,
        "command": list(service.command),
        "environment": dict(service.environment),
        "secrets": sorted(m.target for m in service.secrets),
        "data": sorted(service.volumes),
        "health": list(service.healthcheck.test) if service.healthcheck else None,
        "ports": [p.container for p in service.ports],
        "read_only": service.hardening.read_only,
        "cap_drop": list(service.hardening.cap_drop),
        "memory": to_bytes(service.hardening.mem_limit),
        "cpus": service.hardening.cpus,
        "tmpfs": sorted(path for path, _ in service.hardening.tmpfs),
    }


def health_timing(check: HealthCheck) -> dict[str, float]:
    return {
        "interval": check.interval_s,
        "timeout": check.timeout_s,
        "retries": check.retries,
        "start_period": check.start_period_s,
    }


def rendered_timing(health: dict[str, Any]) -> dict[str, float]:
    return {
        key: health[key] if key == "retries" else seconds(health[key])
        for key in ("interval", "timeout", "retries", "start_period")
    }


def image_name(ref: str) -> str:
    """Images are compared by repository: the tag is the build's business."""
    return ref.rsplit(":", 1)[0]


def start_order(stack: Stack = STACK) -> dict[str, dict[str, str]]:
    """What each service waits for, by the orchestrator's rule (engine.realise): a task waits
    until the services before it are healthy, and the services after a task wait for it to
    have succeeded."""
    waits: dict[str, dict[str, str]] = {}
    before: list[str] = []
    task = None
    for service in stack.services:
        if service.once:
            waits[service.name] = {name: "service_healthy" for name in before}
            before, task = [], service.name
        else:
            waits[service.name] = {task: "service_completed_successfully"} if task else {}
            before.append(service.name)
    return waits


# --- compose -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return render(tool("docker-compose"), "-f", "docker-compose.yml", "config")


def compose_view(doc: dict[str, Any], name: str) -> View:
    svc = doc["services"][name]
    return {
        "image": image_name(svc["image"]),
        "user": svc["user"],
        "command": unescape(svc["command"]),
        "environment": svc.get("environment", {}),
        "secrets": sorted(f"{SECRETS_TARGET_DIR}/{s['target']}" for s in svc.get("secrets", [])),
        # Compose v2 writes volumes in their long form.
        "data": sorted(tuple(v.split(":")[:2]) if isinstance(v, str) else (v["source"], v["target"])
                       for v in svc.get("volumes", [])
                       if not (v if isinstance(v, str) else v["source"]).startswith("/")),
        "health": unescape(svc["healthcheck"]["test"]) if "healthcheck" in svc else None,
        "ports": [int(p.split(":")[2].split("/")[0]) if isinstance(p, str) else p["target"]
                  for p in svc.get("ports", [])],
        "read_only": svc["read_only"],
        "cap_drop": svc["cap_drop"],
        "memory": to_bytes(svc["mem_limit"]),
        "cpus": float(svc["cpus"]) if "cpus" in svc else None,
        "tmpfs": sorted(t.split(":")[0] for t in svc["tmpfs"]),
    }


@pytest.mark.parametrize("name", SERVICES)
def test_compose_agrees(compose: dict[str, Any], name: str) -> None:
    service = STACK.service(name)
    assert compose_view(compose, name) == expected(service)
    svc = compose["services"][name]
    hardening = service.hardening
    if service.healthcheck:
        assert rendered_timing(svc["healthcheck"]) == health_timing(service.healthcheck)
    assert sorted(svc["tmpfs"]) == sorted(f"{p}:{o}" for p, o in hardening.tmpfs)
    assert svc["pids_limit"] == hardening.pids_limit
    assert svc["restart"] == hardening.restart
    assert ("no-new-privileges:true" in svc["security_opt"]) == hardening.no_new_privileges
    assert sorted(svc["networks"]) == sorted(service.networks)
    # Containers are marked as the orchestrator marks them (its status, logs and down use it).
    assert svc["labels"] == {**STACK.labels(), SERVICE_LABEL: name}
    for port in service.ports:
        assert f"{port.host_ip}:{port.host}:{port.container}/tcp" in svc["ports"]
    assert_staged(compose, service)
    waits = {dep: how["condition"] for dep, how in svc.get("depends_on", {}).items()}
    assert waits == start_order()[name]
    assert svc.get("scale", 1) == service.replicas


@pytest.fixture(scope="module")
def compose_ha() -> dict[str, Any]:
    """`up --ha` as compose.ha.yml renders it: Compose v2 (its `!override`)."""
    return render(tool("docker"), "compose", "--project-name", DEFAULT_PROJECT, "-f",
                  "docker-compose.yml", "-f", "compose.ha.yml", "config")


@pytest.mark.parametrize("name", HA_SERVICES)
def test_compose_ha_override_is_up_ha(compose_ha: dict[str, Any], name: str) -> None:
    """-f compose.ha.yml runs what `up --ha` runs in place of the one Postgres, as the
    orchestrator runs it, and points the service and `migrate` at every member."""
    service = HA.service(name)
    assert compose_view(compose_ha, name) == expected(service)
    svc = compose_ha["services"][name]
    if service.healthcheck:
        assert rendered_timing(svc["healthcheck"]) == health_timing(service.healthcheck)
    assert sorted(svc["tmpfs"]) == sorted(f"{p}:{o}" for p, o in service.hardening.tmpfs)
    assert svc["pids_limit"] == service.hardening.pids_limit
    assert svc["restart"] == service.hardening.restart
    assert ("no-new-privileges:true" in svc["security_opt"]) == service.hardening.no_new_privileges
    assert sorted(svc["networks"]) == sorted(service.networks)
    assert svc["labels"] == {**STACK.labels(), SERVICE_LABEL: name}
    assert_staged(compose_ha, service)
    waits = {dep: how["condition"] for dep, how in svc.get("depends_on", {}).items()}
    assert waits == start_order(HA)[name]


def test_compose_ha_runs_no_other_postgres_or_redis(compose_ha: dict[str, Any]) -> None:
    """The one Postgres is left to a profile nothing starts, the one Redis is gone; the rest is
    as without them."""
    assert set(compose_ha["services"]) == {s.name for s in HA.services}
    assert {n.name: n.internal for n in HA.networks} == {
        name: bool(net.get("internal")) for name, net in compose_ha["networks"].items()}
    assert sorted(compose_ha["volumes"]) == sorted(HA.volumes)
    for name in set(SERVICES) - set(HA_SERVICES) - {"postgres", "redis"}:
        assert compose_view(compose_ha, name) == expected(HA.service(name))


def assert_staged(compose: dict[str, Any], service: Service) -> None:
    """Outside swarm, compose bind-mounts each container's staged copy (owner uid, mode 0400)."""
    svc = compose["services"][service.name]
    for mount in service.secrets:
        source = next(s["source"] for s in svc["secrets"] if s["target"] == Path(mount.target).name)
        staged = STAGE_ROOT / DEFAULT_PROJECT / service.name / mount.secret
        assert Path(compose["secrets"][source]["file"]) == staged


@pytest.fixture(scope="module")
def compose_tls() -> dict[str, Any]:
    return render(tool("docker-compose"), "-f", "docker-compose.yml", "-f", "compose.tls.yml",
                  "config")


@pytest.mark.parametrize("name", SERVICES)
def test_compose_tls_override_is_up_tls(
    compose: dict[str, Any], compose_tls: dict[str, Any], name: str
) -> None:
    """-f compose.tls.yml makes the proxy what `up --tls` makes it, and changes nothing else."""
    if name == "proxy":
        assert compose_view(compose_tls, name) == expected(TLS.service(name))
        assert_staged(compose_tls, TLS.service(name))
    else:
        assert compose_view(compose_tls, name) == compose_view(compose, name)
    assert sorted(compose_tls["services"][name]["networks"]) == sorted(
        compose["services"][name]["networks"])


@pytest.mark.parametrize("name", HA_REDIS)
def test_compose_ha_redis_servers_and_sentinels_ask_dns_as_the_orchestrator_does(
        compose_ha: dict[str, Any], name: str) -> None:
    assert compose_ha["services"][name]["dns_opt"] == list(DNS_OPTIONS)


def test_compose_ha_override_replaces_redis_and_points_its_clients_at_the_sentinels(
        compose_ha: dict[str, Any]) -> None:
    assert "redis" not in compose_ha["services"]
    for name in ("service", "stream"):
        assert compose_ha["services"][name]["environment"] == dict(HA.service(name).environment)
    migrate = [s.name for s in HA.services].index("migrate")
    assert {name: wait["condition"] for name, wait in
            compose_ha["services"]["migrate"]["depends_on"].items()} == {
        s.name: "service_healthy" for s in HA.services[:migrate]}


@pytest.mark.parametrize("key", sorted(MONITORED.images))
def test_compose_builds_every_image_once_as_the_orchestrator_does(
    compose: dict[str, Any], key: str
) -> None:
    """Every image of the stack (not `bench`'s load generator, which compose never runs)."""
    spec = IMAGES[key]
    builds = [s["build"] for s in compose["services"].values() if "build" in s
              and image_name(s["image"]) == spec.repository]
    assert len(builds) == 1, f"{key}: built by {len(builds)} services"
    assert Path(builds[0]["context"]) == (REPO / spec.context).resolve()
    assert builds[0].get("dockerfile", "Dockerfile") == spec.dockerfile
    assert builds[0]["args"]["BASE_IMAGE"] == spec.base
    if spec.host_wheels:  # the root Dockerfile: its service stage, from PyPI by default
        assert (builds[0]["target"], builds[0]["args"]["WHEELS"]) == ("service", "pypi")


@pytest.mark.parametrize("key", sorted(IMAGES))
def test_each_recipe_defaults_to_the_pinned_base(key: str) -> None:
    """`docker build` of a recipe alone (no build argument) uses the base `IMAGES` pins."""
    spec = IMAGES[key]
    recipe = (REPO / spec.context / spec.dockerfile).read_text()
    assert re.findall(r"^ARG BASE_IMAGE=(\S+)$", recipe, re.MULTILINE) == [spec.base]


def test_compose_sets_up_its_secrets_in_a_one_shot_of_its_own(compose: dict[str, Any]) -> None:
    """The one service compose has beyond the stack: `docker compose run --rm setup` does what
    `python -m orchestrate secrets` does, in a container, with no Python on the host."""
    assert set(compose["services"]) - set(SERVICES) == {"setup", "prometheus"}
    setup = compose["services"]["setup"]
    assert setup["profiles"] == ["setup"]  # not started by `up`
    assert setup["build"]["target"] == "setup"
    assert setup["command"][:4] == ["python", "-m", "orchestrate", "secrets"]
    assert setup["network_mode"] == "none" and setup["read_only"] is True
    assert setup["cap_drop"] == ["ALL"]
    assert sorted(setup["cap_add"]) == ["CHOWN", "DAC_OVERRIDE", "FOWNER"]
    mounts = {v.split(":")[1] for v in setup["volumes"]}
    assert mounts == {"/repo/secrets", "/repo/build/secrets"}


def test_compose_runs_prometheus_as_up_monitoring_does(compose: dict[str, Any]) -> None:
    prometheus = MONITORED.service("prometheus")
    svc = compose["services"]["prometheus"]
    assert svc["profiles"] == ["monitoring"]
    assert compose_view(compose, "prometheus") == expected(prometheus)
    assert rendered_timing(svc["healthcheck"]) == health_timing(prometheus.healthcheck)
    assert svc["ports"] == [f"127.0.0.1:{DEFAULT_MONITORING_PORT}:9090/tcp"]
    assert sorted(svc["networks"]) == sorted(prometheus.networks)


def test_compose_networks_and_volumes_agree(compose: dict[str, Any]) -> None:
    assert {n.name: n.internal for n in STACK.networks} == {
        name: bool(net.get("internal")) for name, net in compose["networks"].items()
    }
    assert sorted(compose["volumes"]) == sorted(MONITORED.volumes)
    for item in [*compose["networks"].values(), *compose["volumes"].values()]:
        assert item["labels"] == STACK.labels()


# --- swarm -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm() -> dict[str, Any]:
    return render(tool("docker"), "stack", "config", "-c", "stack.yml")


def swarm_view(doc: dict[str, Any], name: str) -> View:
    svc = doc["services"][name]
    mounts = svc.get("volumes", [])
    tmpfs_volumes = {
        n for n, v in doc["volumes"].items() if v.get("driver_opts", {}).get("type") == "tmpfs"
    }
    return {
        "image": image_name(svc["image"]),
        "user": svc["user"],
        "command": svc["command"],
        "environment": svc.get("environment", {}),
        "secrets": sorted(f"{SECRETS_TARGET_DIR}/{s['target']}" for s in svc.get("secrets", [])),
        "data": sorted(
            (m["source"], m["target"])
            for m in mounts
            if m["type"] == "volume" and m["source"] not in tmpfs_volumes
        ),
        "health": svc["healthcheck"]["test"] if "healthcheck" in svc else None,
        "ports": [p["target"] for p in svc.get("ports", [])],
        "read_only": svc["read_only"],
        "cap_drop": svc["cap_drop"],
        "memory": to_bytes(svc["deploy"]["resources"]["limits"]["memory"]),
        "cpus": (float(svc["deploy"]["resources"]["limits"]["cpus"])
                 if "cpus" in svc["deploy"]["resources"]["limits"] else None),
        # Swarm tmpfs mounts are root-owned, so a uid-owned one is a tmpfs-backed volume.
        "tmpfs": sorted(
            m["target"] for m in mounts if m["type"] == "tmpfs" or m.get("source") in tmpfs_volumes
        ),
    }


@pytest.mark.parametrize("name", SERVICES)
def test_swarm_agrees(swarm: dict[str, Any], name: str) -> None:
    service = STACK.service(name)
    assert swarm_view(swarm, name) == expected(service)
    svc = swarm["services"][name]
    if service.healthcheck:
        assert rendered_timing(svc["healthcheck"]) == health_timing(service.healthcheck)
    # Swarm has no start order: a task is restarted until it has succeeded once.
    policy = svc["deploy"]["restart_policy"]["condition"]
    assert policy == ("on-failure" if service.once else "any")
    assert svc["deploy"]["replicas"] == service.replicas
    if not service.once:
        assert svc["deploy"]["update_config"]["order"] == service.update_order
    assert svc["deploy"]["resources"]["limits"]["pids"] == service.hardening.pids_limit
    assert sorted(svc["networks"]) == sorted(service.networks)
    assert svc["labels"] == {**STACK.labels(), SERVICE_LABEL: name}
    assert svc["deploy"]["labels"] == STACK.labels()
    for port in service.ports:
        assert {"target": port.container, "published": port.host}.items() <= svc["ports"][0].items()
    assert swarm_secrets(svc) == {(m.secret, m.target, m.uid, m.gid, m.mode)
                                  for m in service.secrets}


def swarm_secrets(svc: dict[str, Any]) -> set[tuple[str, str, int, int, int]]:
    """Swarm delivers secrets itself: (source, target, owner uid, gid, mode) of each."""
    return {
        (s["source"], f"{SECRETS_TARGET_DIR}/{s['target']}", int(s["uid"]), int(s["gid"]),
         s["mode"])
        for s in svc.get("secrets", [])
    }


@pytest.fixture(scope="module")
def swarm_tls() -> dict[str, Any]:
    return render(tool("docker"), "stack", "config", "-c", "stack.yml", "-c", "stack.tls.yml")


@pytest.mark.parametrize("name", SERVICES)
def test_swarm_tls_override_is_up_tls(
    swarm: dict[str, Any], swarm_tls: dict[str, Any], name: str
) -> None:
    """-c stack.tls.yml makes the proxy what `up --tls` makes it, and changes nothing else."""
    if name == "proxy":
        proxy = TLS.service(name)
        assert swarm_view(swarm_tls, name) == expected(proxy)
        assert swarm_secrets(swarm_tls["services"][name]) == {
            (m.secret, m.target, m.uid, m.gid, m.mode) for m in proxy.secrets}
        assert {name: Path(s["file"]) for name, s in swarm_tls["secrets"].items()} == {
            name: REPO / SECRETS_DIR / name for name in TLS.secrets}
    else:
        assert swarm_tls["services"][name] == swarm["services"][name]


@pytest.fixture(scope="module")
def swarm_ha() -> dict[str, Any]:
    return render(tool("docker"), "stack", "config", "-c", "stack.yml", "-c", "stack.ha.yml")


@pytest.mark.parametrize("name", HA_SERVICES)
def test_swarm_ha_override_is_up_ha(swarm_ha: dict[str, Any], name: str) -> None:
    """-c stack.ha.yml runs what `up --ha` runs, each member a service of one task, and
    points the service and `migrate` at every member."""
    service = HA.service(name)
    assert swarm_view(swarm_ha, name) == expected(service)
    svc = swarm_ha["services"][name]
    if service.healthcheck:
        assert rendered_timing(svc["healthcheck"]) == health_timing(service.healthcheck)
    assert svc["deploy"]["replicas"] == service.replicas
    if not service.once:
        assert svc["deploy"]["update_config"]["order"] == service.update_order
    assert svc["deploy"]["resources"]["limits"]["pids"] == service.hardening.pids_limit
    assert sorted(svc["networks"]) == sorted(service.networks)
    assert svc["labels"] == {**STACK.labels(), SERVICE_LABEL: name}
    assert swarm_secrets(svc) == {(m.secret, m.target, m.uid, m.gid, m.mode)
                                  for m in service.secrets}


def test_swarm_ha_runs_no_task_of_the_single_postgres_and_redis(swarm_ha: dict[str, Any]) -> None:
    """Swarm keeps the services of every file it is given: the one Postgres and the one Redis
    run no task; the service and the stream find Redis through the Sentinels."""
    for name in ("postgres", "redis"):
        assert swarm_ha["services"][name]["deploy"]["replicas"] == 0
    assert set(swarm_ha["services"]) == {s.name for s in HA.services} | {"postgres", "redis"}
    assert {n.name for n in HA.networks} == set(swarm_ha["networks"])
    assert set(HA.volumes) <= set(swarm_ha["volumes"])
    assert {name: Path(s["file"]) for name, s in swarm_ha["secrets"].items()} == {
        name: REPO / SECRETS_DIR / name for name in dict.fromkeys((*STACK.secrets, *HA.secrets))}
    for name in ("service", "stream"):
        assert swarm_ha["services"][name]["environment"] == dict(HA.service(name).environment)
    # Each Redis server and Sentinel writes its own files to /data: a volume each.
    data = {next(m["source"] for m in swarm_ha["services"][name]["volumes"]
                 if m["target"] == "/data") for name in HA_REDIS}
    assert len(data) == len(HA_REDIS)


def test_swarm_networks_volumes_and_secret_files_agree(swarm: dict[str, Any]) -> None:
    assert {n.name: n.internal for n in STACK.networks} == {
        name: bool(net.get("internal")) for name, net in swarm["networks"].items()
    }
    assert set(STACK.volumes) <= set(swarm["volumes"])
    assert {name: Path(s["file"]) for name, s in swarm["secrets"].items()} == {
        name: REPO / SECRETS_DIR / name for name in STACK.secrets
    }


# --- Kubernetes --------------------------------------------------------------------------------


def workload_of(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The Deployment or StatefulSet that runs the stack's service `name`, as its container
    or (a task) as an init container."""
    return next(
        o
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
        and any(c["name"] == name for c in containers_of(o))
    )


def containers_of(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def container_of(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(c for c in containers_of(workload_of(objects, name)) if c["name"] == name)


def k8s_health(container: dict[str, Any]) -> list[str] | None:
    liveness = container.get("livenessProbe")
    if liveness is None:
        return None
    if "httpGet" in liveness:
        path = liveness["httpGet"]["path"]
        return ["CMD", "python", "-m", "service.probe"] + (
            [] if path == probe_default_path() else [path]
        )
    command = liveness["exec"]["command"]
    return ["CMD-SHELL", command[2]] if command[:2] == ["sh", "-c"] else ["CMD", *command]


def k8s_cpus(quantity: str) -> float:
    """A Kubernetes CPU quantity ("2", "500m") in CPUs."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def k8s_view(objects: list[dict[str, Any]], name: str, stack: Stack = STACK) -> View:
    workload = workload_of(objects, name)
    pod = workload["spec"]["template"]["spec"]
    container = container_of(objects, name)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"] if v["name"] in mounts}
    # Secret names behind the /run/secrets volume (a plain secret or a projected volume).
    secret_volumes = {n: v for n, v in volumes.items() if "secret" in v or "projected" in v}
    assert [mounts[n] for n in secret_volumes] == [SECRETS_TARGET_DIR]
    secret_names = [
        v["secret"]["secretName"] if "secret" in v else source["secret"]["name"]
        for v in secret_volumes.values()
        for source in v.get("projected", {}).get("sources", [v])
    ]
    data = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "Secret"}
    keys = sorted(key for secret in secret_names for key in data[secret])
    environment = {e["name"]: e["value"] for e in container.get("env", [])}
    if "PGDATA" in environment:
        # A fresh volume claim may hold lost+found, which initdb refuses: data go one level down.
        wanted = dict(stack.service(name).environment)["PGDATA"]
        assert environment.pop("PGDATA").startswith(wanted)
        environment["PGDATA"] = wanted
    security = pod["securityContext"]
    return {
        "image": image_name(container["image"]),
        "user": f"{security['runAsUser']}:{security['runAsGroup']}",
        "command": container["args"],
        "environment": environment,
        "secrets": sorted(f"{SECRETS_TARGET_DIR}/{k}" for k in keys),
        "data": sorted(
            (c["metadata"]["name"], mounts[c["metadata"]["name"]])
            for c in workload["spec"].get("volumeClaimTemplates", [])
            if c["metadata"]["name"] in mounts
        ),
        "health": k8s_health(container),
        "ports": [],  # pods publish nothing: the Service stands where the proxy does
        "read_only": container["securityContext"]["readOnlyRootFilesystem"],
        "cap_drop": container["securityContext"]["capabilities"]["drop"],
        "memory": to_bytes(container["resources"]["limits"]["memory"]),
        # Every pod has a CPU limit (a scheduler wants one); the Docker stack limits the CPUs of
        # the service alone, where the number of its workers follows it.
        "cpus": (k8s_cpus(container["resources"]["limits"]["cpu"])
                 if stack.service(name).hardening.cpus else None),
        "tmpfs": sorted(
            mounts[n] for n, v in volumes.items() if v.get("emptyDir", {}).get("medium") == "Memory"
        ),
    }


@pytest.mark.parametrize("name", K8S_SERVICES)
def test_kubernetes_agrees(k8s_objects: list[dict[str, Any]], name: str) -> None:
    service = STACK.service(name)
    assert k8s_view(k8s_objects, name) == expected(service)
    workload = workload_of(k8s_objects, name)
    pod = workload["spec"]["template"]["spec"]
    container = container_of(k8s_objects, name)
    assert container["securityContext"]["allowPrivilegeEscalation"] is (
        not service.hardening.no_new_privileges
    )
    # Kubernetes cannot chown a Secret's files to a uid: they are root-owned, mode 0440, and
    # their group is the pod's fsGroup, which is the container user's own group.
    assert {m.gid for m in service.secrets} == {pod["securityContext"]["fsGroup"]}
    if service.rotation_path:
        assert container["readinessProbe"]["httpGet"]["path"] == service.rotation_path
    # A task runs to completion before the pod's service starts: an init container.
    assert (container in pod.get("initContainers", [])) is service.once
    assert workload["metadata"]["labels"][PROJECT_LABEL] == STACK.project
    if not service.once:
        assert workload["spec"]["replicas"] == service.replicas
    if service.update_order == "start-first":
        assert workload["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_kubernetes_pods_ask_to_be_scraped_where_prometheus_scrapes_the_replicas(
    k8s_objects: list[dict[str, Any]],
) -> None:
    """docker/prometheus/prometheus.yml scrapes each replica's port for /metrics; pods say the
    same with the prometheus.io annotations."""
    config = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "service"]
    [discovery] = job["dns_sd_configs"]
    annotations = workload_of(k8s_objects, "service")["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == discovery["port"]
    assert annotations["prometheus.io/path"] == job.get("metrics_path", "/metrics")
    assert discovery["names"] == ["service"]


def test_prometheus_scrapes_every_reader_of_the_change_stream_where_it_serves_metrics(
    k8s_objects: list[dict[str, Any]],
) -> None:
    """docker/prometheus/prometheus.yml finds the readers by their name on the frontend network,
    which Prometheus shares with them, at the port they serve metrics on (PORT); pods say the
    same with the prometheus.io annotations. Nothing publishes that port."""
    stream = MONITORED.service("stream")
    port = int(dict(stream.environment)["PORT"])
    config = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == stream.name]
    [discovery] = job["dns_sd_configs"]
    assert (discovery["names"], discovery["port"]) == ([stream.name], port)
    assert "frontend" in set(stream.networks) & set(MONITORED.service("prometheus").networks)
    assert stream.ports == ()
    annotations = workload_of(k8s_objects, stream.name)["spec"]["template"]["metadata"][
        "annotations"]
    assert (annotations["prometheus.io/scrape"], int(annotations["prometheus.io/port"]),
            annotations["prometheus.io/path"]) == ("true", port, job.get("metrics_path",
                                                                       "/metrics"))
    # A rolling update of the pods waits for each new reader to take its turn, as `up` does.
    readiness = container_of(k8s_objects, stream.name)["readinessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == (stream.ready_path, "metrics")


def test_the_stream_logs_in_as_the_role_postgres_admits_and_migrate_grants_to() -> None:
    """One role name in three places: the readers' DATABASE_URL, the Postgres image's
    CACHESTACK_STREAM_ROLE (its login, its pg_hba line) and migrate's DATABASE_STREAM_ROLE
    (its SELECT rights)."""
    reader = urlsplit(dict(STACK.service("stream").environment)["DATABASE_URL"])
    assert reader.password is None and "sslmode=verify-full" in reader.query
    assert (reader.username
            == dict(STACK.service("postgres").environment)["CACHESTACK_STREAM_ROLE"]
            == dict(STACK.service("migrate").environment)["DATABASE_STREAM_ROLE"])


def test_kubernetes_service_stands_where_the_proxy_does(k8s_objects: list[dict[str, Any]]) -> None:
    proxy = STACK.service("proxy")
    service = next(o for o in k8s_objects if o["kind"] == "Service"
                   and o["metadata"]["name"] == "service")
    assert [p["port"] for p in service["spec"]["ports"]] == [p.container for p in proxy.ports]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "service"}
    pod = container_of(k8s_objects, "service")
    assert [p["containerPort"] for p in pod["ports"] if p["name"] == "http"] == [
        p.container for p in proxy.ports]


def servers_named(url: str) -> set[tuple[str, int]]:
    """(host, port) of each server a URL names, libpq's multi-host URLs included."""
    hosts = urlsplit(url).netloc.rpartition("@")[2].split(",")
    return {(host.rpartition(":")[0], int(host.rpartition(":")[2])) for host in hosts}


def admitted(objects: list[dict[str, Any]], labels: dict[str, str], way: str
             ) -> set[tuple[str, int]]:
    """Who the NetworkPolicies let connect to pods with `labels` (way="ingress"), or where they
    let those pods connect (way="egress"): (the peers' app name or component, or "dns", port)."""
    peers = "from" if way == "ingress" else "to"
    found = set()
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not all(labels.get(k) == v for k, v in selector.items()):
            continue
        for rule in policy["spec"].get(way, []):
            assert rule.get(peers) and rule.get("ports"), f"{policy['metadata']['name']}: open"
            for peer in rule[peers]:
                match = peer.get("podSelector", {}).get("matchLabels", {})
                kube_dns = peer.get("namespaceSelector", {}).get("matchLabels") == {
                    "kubernetes.io/metadata.name": "kube-system"}
                who = ("dns" if kube_dns else match.get("app.kubernetes.io/name")
                       or match["app.kubernetes.io/component"])
                found |= {(who, port["port"]) for port in rule["ports"]}
    return found


@pytest.mark.parametrize("name", K8S_SERVICES)
def test_kubernetes_pods_reach_only_the_servers_their_settings_name(
    k8s_objects: list[dict[str, Any]], name: str
) -> None:
    """As the replicas have no route out of a Docker host (internal networks only), their pods
    may connect to the cluster's DNS and the servers their URLs name, and nowhere else."""
    pod = workload_of(k8s_objects, name)
    named = {
        (url.hostname, url.port)
        for container in containers_of(pod)
        for setting in container.get("env", [])
        if "://" in setting.get("value", "")
        for url in [urlsplit(setting["value"])]
    }
    labels = workload_of(k8s_objects, name)["spec"]["template"]["metadata"]["labels"]
    assert admitted(k8s_objects, labels, "egress") == {("dns", 53)} | named


@pytest.mark.parametrize("name", HA_SERVICES)
def test_kubernetes_ha_overlay_is_up_ha(k8s_ha_objects: list[dict[str, Any]], name: str) -> None:
    """k8s/overlays/ha/ runs what `up --ha` runs: each member a StatefulSet of one pod, the
    service and `migrate` pointed at every member."""
    service = HA.service(name)
    assert k8s_view(k8s_ha_objects, name, HA) == expected(service)
    workload = workload_of(k8s_ha_objects, name)
    pod = workload["spec"]["template"]["spec"]
    assert {m.gid for m in service.secrets} == {pod["securityContext"]["fsGroup"]}
    assert pod["automountServiceAccountToken"] is False
    if not service.once:
        assert workload["spec"]["replicas"] == service.replicas


def test_kubernetes_ha_needs_no_access_to_the_kubernetes_api(
        k8s_ha_objects: list[dict[str, Any]]) -> None:
    """Patroni keeps its state in etcd, not in the Kubernetes API: no pod holds a token, and
    there is no role to grant. And the one Postgres is gone."""
    kinds = {o["kind"] for o in k8s_ha_objects}
    assert not kinds & {"ServiceAccount", "Role", "RoleBinding", "ClusterRole",
                        "ClusterRoleBinding"}
    workloads = [o for o in k8s_ha_objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert all(w["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
               for w in workloads)
    assert {c["name"] for w in workloads for c in containers_of(w)} == {
        s.name for s in HA.services if s.name != "proxy"}


def test_kubernetes_ha_members_reach_each_other_and_etcd_only(
        k8s_ha_objects: list[dict[str, Any]]) -> None:
    """The service pods and the change stream's reach each member's Postgres (and nothing of
    Patroni's or etcd's) and the Redis servers and Sentinels; the members reach each other's
    Postgres and REST API, and etcd; etcd its peers."""
    def labels(name: str) -> dict[str, str]:
        return workload_of(k8s_ha_objects, name)["spec"]["template"]["metadata"]["labels"]

    for client in ("service", "stream"):
        url = dict(HA.service(client).environment)["DATABASE_URL"]
        assert admitted(k8s_ha_objects, labels(client), "egress") == {
            ("dns", 53), *servers_named(url), *redis_ha_named(HA.service(client))}
    member, etcd = labels(PATRONI_MEMBERS[0]), labels(ETCD_MEMBERS[0])
    assert admitted(k8s_ha_objects, member, "ingress") == {
        ("service", 5432), ("stream", 5432), ("patroni", 5432), ("patroni", 8008)}
    assert admitted(k8s_ha_objects, member, "egress") == {
        ("dns", 53), ("patroni", 5432), ("patroni", 8008), ("etcd", 2379)}
    assert admitted(k8s_ha_objects, etcd, "ingress") == {("patroni", 2379), ("etcd", 2380)}
    assert admitted(k8s_ha_objects, etcd, "egress") == {("dns", 53), ("etcd", 2380)}


def redis_ha_named(client: Service) -> set[tuple[str, int]]:
    """(host, port) of every Redis server and Sentinel a client of `up --ha` may reach: the
    Sentinels its settings name, and each server, which they may name the primary."""
    sentinels = dict(client.environment)["REDIS_SENTINELS"].split(",")
    return {(name, REDIS_PORT) for name in REDIS_SERVERS} | {
        (address.rpartition(":")[0], int(address.rpartition(":")[2])) for address in sentinels}


def test_kubernetes_ha_redis_servers_and_sentinels_reach_each_other_only(
        k8s_ha_objects: list[dict[str, Any]]) -> None:
    """Only the service pods, the change stream's, the Redis servers and the Sentinels reach a
    server (6379) or a Sentinel (26379); servers and Sentinels reach each other and nothing
    else. The base's one Redis is gone."""
    def labels(name: str) -> dict[str, str]:
        return workload_of(k8s_ha_objects, name)["spec"]["template"]["metadata"]["labels"]

    server, sentinel = labels(REDIS_SERVERS[0]), labels(SENTINELS[0])
    roles = {server["app.kubernetes.io/component"]: REDIS_PORT,
             sentinel["app.kubernetes.io/component"]: SENTINEL_PORT}
    assert {labels(name)["app.kubernetes.io/component"] for name in HA_REDIS} == set(roles)
    for pod, port in ((server, REDIS_PORT), (sentinel, SENTINEL_PORT)):
        assert admitted(k8s_ha_objects, pod, "ingress") == {
            (peer, port) for peer in ("service", "stream", *roles)}
        assert admitted(k8s_ha_objects, pod, "egress") == {("dns", 53), *roles.items()}
    names = {(o["kind"], o["metadata"]["name"]) for o in k8s_ha_objects}
    assert not names & {("StatefulSet", "redis"), ("Service", "redis")}


def test_kubernetes_ingress_serves_tls_with_the_proxys_certificate(
    k8s_objects: list[dict[str, Any]],
) -> None:
    """The Ingress stands where the proxy of `up --tls` does: TLS with its certificate and
    key, in front of the service's port, and /metrics is not among the paths it forwards."""
    [ingress] = [o for o in k8s_objects if o["kind"] == "Ingress"]
    [tls] = ingress["spec"]["tls"]
    [secret] = [o for o in k8s_objects if o["kind"] == "Secret"
                and o["metadata"]["name"] == tls["secretName"]]
    assert secret["type"] == "kubernetes.io/tls"
    kustomization = yaml.safe_load((REPO / "k8s" / "kustomization.yaml").read_text())
    [files] = [g["files"] for g in kustomization["secretGenerator"]
               if secret["metadata"]["name"].startswith(g["name"] + "-")]
    assert sorted(f.split("=")[1] for f in files) == sorted(
        f"{SECRETS_DIR}/{m.secret}" for m in TLS.service("proxy").secrets)
    [rule] = ingress["spec"]["rules"]
    paths = rule["http"]["paths"]
    assert {p["backend"]["service"]["name"] for p in paths} == {"service"}
    assert not [p for p in paths if "/metrics".startswith(p["path"].rstrip("/") or "/")]


def test_only_what_publishes_a_port_has_a_route_out() -> None:
    """The replicas hold the credentials of Postgres and Redis: they, the stores and the
    task are on internal networks only; what publishes a port needs one that is not."""
    for stack in (STACK, MONITORED, TLS):
        outward = {n.name for n in stack.networks if not n.internal}
        for service in stack.services:
            assert bool(outward & set(service.networks)) == bool(service.ports), service.name


def test_the_proxy_holds_the_largest_request_a_replica_accepts() -> None:
    """docker/proxy/haproxy.cfg buffers a request whole before a replica sees it: its buffer
    holds the largest body the service takes with room for the request's headers, and it turns
    TLS on by the setting the description gives the proxy."""
    config = (REPO / "docker" / "proxy" / "haproxy.cfg").read_text()
    [bufsize] = re.findall(r"^\s*tune\.bufsize (\d+)$", config, re.MULTILINE)
    assert int(bufsize) >= MAX_BODY_BYTES + 4096
    assert "option http-buffer-request" in config
    assert f".if defined({PROXY_TLS_SETTING})" in config
    assert dict(TLS.service("proxy").environment) == {
        PROXY_TLS_SETTING: TLS.service("proxy").secrets[0].target}


def test_the_proxy_finds_the_replicas_by_the_service_name() -> None:
    """docker/proxy/haproxy.cfg's server template names the replicated service and its port,
    and has a slot for as many replicas as `up --replicas` allows."""
    config = (REPO / "docker" / "proxy" / "haproxy.cfg").read_text()
    [template] = re.findall(r"server-template \w+ 1-(\d+) (\w+):(\d+)", config)
    replicated = [s for s in STACK.services if s.rotation_path]
    listens = [int(s.command[s.command.index("--port") + 1]) for s in replicated]
    assert [(name, int(port)) for _, name, port in [template]] == [
        (s.name, port) for s, port in zip(replicated, listens, strict=True)]
    assert int(template[0]) == MAX_REPLICAS
    [check] = re.findall(r"http-check send meth GET uri (\S+)", config)
    assert [check] == [s.rotation_path for s in replicated]


def test_every_format_uses_the_same_images(
    compose: dict[str, Any], swarm: dict[str, Any], k8s_objects: list[dict[str, Any]]
) -> None:
    for name in SERVICES:
        refs = {
            compose["services"][name]["image"],
            swarm["services"][name]["image"],
            *([container_of(k8s_objects, name)["image"]] if name in K8S_SERVICES else []),
        }
        assert len(refs) == 1, f"{name}: {refs}"
        # What the formats pull by default is the release in pyproject.toml, not `latest`.
        assert refs.pop().endswith(":" + VERSION), name


def test_secrets_in_k8s_are_generated_from_the_same_files() -> None:
    """Those of `up --tls`: the Ingress's certificate is the proxy's (its Secret's keys are
    the ones kubernetes.io/tls requires)."""
    kustomization = yaml.safe_load((REPO / "k8s" / "kustomization.yaml").read_text())
    files = dict(f.split("=") for g in kustomization["secretGenerator"] for f in g["files"])
    assert sorted(files.values()) == sorted(f"{SECRETS_DIR}/{name}" for name in TLS.secrets)
    overlay = yaml.safe_load((REPO / "k8s" / "overlays" / "ha" / "kustomization.yaml").read_text())
    files = dict(f.split("=") for g in overlay["secretGenerator"] for f in g["files"])
    assert sorted(files.values()) == sorted(
        f"{SECRETS_DIR}/{name}" for name in describe_stack(tls=True, ha=True).secrets)
    assert all(key == Path(path).name for key, path in files.items()
               if key not in ("tls.crt", "tls.key"))
    assert run("git", "check-ignore", "-q", "k8s/secrets/x", check=False).returncode == 0
