"""Offline checks of the Kubernetes manifests: schema validity and the hardening rules."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlsplit

import pytest

from orchestrate.stack import ETCD_MEMBERS, PATRONI_MEMBERS, REDIS_SERVERS, SENTINELS
from tests.support import require

from .helpers import SECRET_NAMES

NAMESPACE = "cachestack"
K8S_VERSION = "1.32.0"  # the kubectl installed here
SECRET_DIR = "/run/secrets"
WORKLOADS = {"postgres": "StatefulSet", "redis": "StatefulSet", "service": "Deployment",
             "stream": "Deployment"}
# The pods that log in to Postgres and Redis: the service's, and the change stream's readers.
CLIENTS = ("service", "stream")
# k8s/overlays/ha/: a StatefulSet each
HA_MEMBERS = (*PATRONI_MEMBERS, *ETCD_MEMBERS, *REDIS_SERVERS, *SENTINELS)

Obj = dict[str, Any]


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[Obj], app: str) -> Obj:
    return one(objects, WORKLOADS[app], app)["spec"]["template"]["spec"]


def containers(spec: Obj) -> list[Obj]:
    return spec.get("initContainers", []) + spec["containers"]


def assert_valid(objects: list[Obj]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        kubernetes_validate = None
    require(
        kubernetes_validate is not None, "kubernetes-validate (pip install kubernetes-validate)"
    )
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_object_passes_strict_schema_validation(k8s_objects: list[Obj]) -> None:
    assert_valid(k8s_objects)


def test_every_object_of_the_ha_overlay_passes_strict_schema_validation(
        k8s_ha_objects: list[Obj]) -> None:
    assert_valid(k8s_ha_objects)


def test_everything_lives_in_the_namespace(k8s_objects: list[Obj]) -> None:
    one(k8s_objects, "Namespace", NAMESPACE)
    for obj in k8s_objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["org.cachestack.project"] == "cachestack"


def test_secrets_come_from_the_generator_with_the_file_contents(k8s_objects: list[Obj]) -> None:
    # The Ingress's TLS Secret has the keys kubernetes.io/tls requires.
    keys = {"proxy.crt": "tls.crt", "proxy.key": "tls.key"}
    data: dict[str, str] = {}
    for secret in find(k8s_objects, "Secret"):
        assert "stringData" not in secret
        data.update(secret["data"])
    assert sorted(data) == sorted(keys.get(name, name) for name in SECRET_NAMES)
    for name in SECRET_NAMES:
        assert base64.b64decode(data[keys.get(name, name)]).decode() == f"test-{name}"


@pytest.mark.parametrize("app", sorted(WORKLOADS))
def test_pods_are_hardened(k8s_objects: list[Obj], app: str) -> None:
    assert_hardened(pod_spec(k8s_objects, app), app)


@pytest.mark.parametrize("app", sorted(HA_MEMBERS))
def test_the_ha_members_are_hardened_and_hold_secrets_only_as_files(
        k8s_ha_objects: list[Obj], app: str) -> None:
    spec = one(k8s_ha_objects, "StatefulSet", app)["spec"]["template"]["spec"]
    assert_hardened(spec, app)
    assert_secrets_are_files(spec)


def assert_hardened(spec: Obj, app: str) -> None:
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert "hostNetwork" not in spec and "hostPID" not in spec
    for container in containers(spec):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert not sc.get("privileged", False)
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys()
        assert {"cpu", "memory"} <= resources["limits"].keys()
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp, f"{app}: a writable /tmp is needed with a read-only root filesystem"


@pytest.mark.parametrize("app", sorted(WORKLOADS))
def test_secrets_are_read_only_files_never_env(k8s_objects: list[Obj], app: str) -> None:
    assert_secrets_are_files(pod_spec(k8s_objects, app))


def assert_secrets_are_files(spec: Obj) -> None:
    secret_volumes = {}
    for volume in spec["volumes"]:
        if "secret" in volume:
            secret_volumes[volume["name"]] = volume["secret"]
        elif "projected" in volume and any("secret" in s for s in volume["projected"]["sources"]):
            secret_volumes[volume["name"]] = volume["projected"]
    for container in containers(spec):
        mounted = [m for m in container["volumeMounts"] if m["name"] in secret_volumes]
        assert len(mounted) == 1, f"{container['name']}: one secrets volume at {SECRET_DIR}"
    for source in secret_volumes.values():
        assert source["defaultMode"] in (0o400, 0o440)
        assert not any(item.get("mode") for item in source.get("items", []))
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    for container in containers(spec):
        for env in container.get("env", []):
            assert "secretKeyRef" not in env.get("valueFrom", {}), env["name"]
            value = env.get("value", "")
            assert not any(f"test-{name}" in value for name in SECRET_NAMES), env["name"]
            assert "://" not in value or urlsplit(value).password is None, env["name"]
        assert not any("secretRef" in e for e in container.get("envFrom", []))
        for mount in container["volumeMounts"]:
            assert "subPath" not in mount and "subPathExpr" not in mount
            if mount["name"] in secret_volumes:
                assert mount["mountPath"] == SECRET_DIR
                assert mount["readOnly"] is True


def test_service_deployment_probes_replicas_and_budget(k8s_objects: list[Obj]) -> None:
    deployment = one(k8s_objects, "Deployment", "service")
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"  # not Postgres's state
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    service = one(k8s_objects, "Service", "service")
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    pdb = one(k8s_objects, "PodDisruptionBudget", "service")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_postgres_keeps_its_data_on_a_volume_claim_and_redis_on_none(
    k8s_objects: list[Obj],
) -> None:
    statefulset = one(k8s_objects, "StatefulSet", "postgres")
    claims = [c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]]
    mounts = {m["name"]: m["mountPath"]
              for m in containers(pod_spec(k8s_objects, "postgres"))[0]["volumeMounts"]}
    assert [mounts[c] for c in claims] == ["/var/lib/postgresql/data"]
    assert "volumeClaimTemplates" not in one(k8s_objects, "StatefulSet", "redis")["spec"]


def test_redis_saves_nothing_is_tls_only_and_no_password_is_on_its_command_line(
    k8s_objects: list[Obj],
) -> None:
    command = " ".join(pod_spec(k8s_objects, "redis")["containers"][0]["args"])
    assert "--appendonly no --save " in command
    assert "--port 0 --tls-port 6379" in command
    assert "pass" not in command  # the image writes the users from /run/secrets


def _selects(policy: Obj, labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


def _labels(k8s_objects: list[Obj], app: str) -> dict[str, str]:
    return one(k8s_objects, WORKLOADS[app], app)["spec"]["template"]["metadata"]["labels"]


def test_network_policies_deny_by_default(k8s_objects: list[Obj]) -> None:
    policies = find(k8s_objects, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and sorted(p["spec"]["policyTypes"]) == ["Egress", "Ingress"]
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "a default-deny policy for all pods"
    dns = [p for p in policies if p["spec"]["podSelector"] == {} and p["spec"].get("egress")]
    assert [
        port["port"] for p in dns for rule in p["spec"]["egress"] for port in rule["ports"]
    ] == [53, 53]


@pytest.mark.parametrize(("app", "port"), [("postgres", 5432), ("redis", 6379)])
def test_only_the_service_and_stream_pods_reach_the_backends(
    k8s_objects: list[Obj], app: str, port: int
) -> None:
    rules = [
        rule
        for policy in find(k8s_objects, "NetworkPolicy")
        if _selects(policy, _labels(k8s_objects, app))
        for rule in policy["spec"].get("ingress", [])
    ]
    assert rules, f"{app} admits its clients"
    for rule in rules:
        assert [p["port"] for p in rule["ports"]] == [port]
        assert rule.get("from"), f"{app}: an ingress rule without 'from' admits everyone"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"{app}: only pods of this namespace"
            selector = peer["podSelector"]["matchLabels"]
            client = selector.get("app.kubernetes.io/name")
            assert client in CLIENTS, f"{app} admits {client}"
            assert all(_labels(k8s_objects, client).get(k) == v for k, v in selector.items())
    for client in CLIENTS:
        admitted = [rule for rule in rules for peer in rule["from"]
                    if peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == client]
        assert admitted, f"{app} admits the {client} pods"
        egress = [
            rule
            for policy in find(k8s_objects, "NetworkPolicy")
            if _selects(policy, _labels(k8s_objects, client))
            for rule in policy["spec"].get("egress", [])
            if any(p["port"] == port for p in rule["ports"])
        ]
        assert egress, f"the {client} pods may open connections to {app}:{port}"
