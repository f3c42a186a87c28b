"""deploy/kubernetes/: the manifests agree with the fleet file that uses them.

No cluster runs here, so these checks read the YAML and hold it to what Kubernetes
and modelfleet will do with it: the Service the fleet file names exists, is headless,
selects the vLLM pods and has the port it names; the Role grants what discovery
calls; the gateway runs as the bound service account with the fleet file mounted
where its command reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from modelfleet.discovery.kubernetes import SERVICE_NAME_LABEL, endpoints_of

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def _load(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name) as f:
        return [doc for doc in YAML(typ="safe").load_all(f) if doc is not None]


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    (doc,) = _load("kustomization.yaml")
    return doc


@pytest.fixture(scope="module")
def objects(kustomization) -> list[dict[str, Any]]:
    found = []
    for name in kustomization["resources"]:
        found.extend(_load(name))
    return found


@pytest.fixture(scope="module")
def fleet() -> dict[str, Any]:
    # Plain YAML: the fleet file is also a modelfleet config (checked by `config validate`).
    (doc,) = _load("fleet.yaml")
    return doc


@pytest.fixture(scope="module")
def model(fleet) -> tuple[str, dict[str, Any]]:
    (name, spec), = fleet["models"].items()
    return name, spec


@pytest.fixture(scope="module")
def discover(model) -> dict[str, Any]:
    return model[1]["discover"]["kubernetes"]


def _one(objects, kind: str, name: str | None = None, **where: Any) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)
             and all(o["metadata"].get(k) == v for k, v in where.items())]
    assert len(found) == 1, f"expected one {kind} {name or ''} {where}, found {len(found)}"
    return found[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _deployment_behind(objects, service: dict[str, Any]) -> dict[str, Any]:
    selector = service["spec"]["selector"]
    matches = [o for o in objects if o["kind"] == "Deployment"
               and o["metadata"]["namespace"] == service["metadata"]["namespace"]
               and _selects(selector, o["spec"]["template"]["metadata"]["labels"])]
    assert len(matches) == 1, f"the Service selects {len(matches)} Deployments' pods"
    return matches[0]


def _container_port(container: dict[str, Any], target: int | str) -> dict[str, Any]:
    ports = container.get("ports") or []
    key = "name" if isinstance(target, str) else "containerPort"
    (port,) = [p for p in ports if p.get(key) == target]
    return port


def test_every_object_lives_in_the_discovered_namespace(objects, kustomization, discover):
    assert kustomization["namespace"] == discover["namespace"]
    _one(objects, "Namespace", discover["namespace"])
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == discover["namespace"], obj["metadata"]["name"]


def test_the_service_is_headless_and_selects_the_vllm_pods(objects, discover):
    service = _one(objects, "Service", discover["service"], namespace=discover["namespace"])
    assert service["spec"]["clusterIP"] == "None"
    deployment = _deployment_behind(objects, service)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("vllm/vllm-openai:")


def test_the_named_port_reaches_the_vllm_port_and_its_readiness_probe(objects, discover):
    service = _one(objects, "Service", discover["service"], namespace=discover["namespace"])
    deployment = _deployment_behind(objects, service)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    if discover.get("port_name") is not None:
        (service_port,) = [p for p in service["spec"]["ports"] if p.get("name") == discover["port_name"]]
    else:
        (service_port,) = [p for p in service["spec"]["ports"]
                           if p.get("targetPort", p["port"]) == discover["port"]]
    target = _container_port(container, service_port.get("targetPort", service_port["port"]))
    assert target["protocol"] == "TCP"
    args = container["args"]
    assert args[args.index("--port") + 1] == str(target["containerPort"])
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert _container_port(container, probe["port"]) == target

    # The EndpointSlice controller names the slice's ports after the Service's and
    # numbers them with the pods' target port: what discovery pairs addresses with.
    slice_ = {"metadata": {"name": "s", "labels": {SERVICE_NAME_LABEL: service["metadata"]["name"]}},
              "addressType": "IPv4",
              "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
              "ports": [{"name": p.get("name"), "protocol": p.get("protocol", "TCP"),
                         "port": _container_port(container, p.get("targetPort", p["port"]))
                         ["containerPort"]} for p in service["spec"]["ports"]]}
    ready, _ = endpoints_of([slice_], discover.get("port"), discover.get("port_name"))
    assert ready == (("10.0.0.1", target["containerPort"]),)


def test_the_pods_serve_the_model_the_fleet_file_names(objects, discover, model):
    name, spec = model
    assert spec["backend"] == "vllm"
    service = _one(objects, "Service", discover["service"], namespace=discover["namespace"])
    (container,) = _deployment_behind(objects, service)["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["vllm", "serve"]
    args = container["args"]
    assert args[0] == spec.get("model_path", name)
    assert args[args.index("--served-model-name") + 1] == spec.get("served_name", name)


def test_the_role_grants_what_discovery_calls_to_the_gateways_account(objects, discover):
    namespace = discover["namespace"]
    gateway = _one(objects, "Deployment", "modelfleet-gateway", namespace=namespace)
    account = gateway["spec"]["template"]["spec"]["serviceAccountName"]
    _one(objects, "ServiceAccount", account, namespace=namespace)
    bindings = [b for b in objects if b["kind"] == "RoleBinding"
                and {"kind": "ServiceAccount", "name": account, "namespace": namespace}
                in b["subjects"]]
    assert len(bindings) == 1
    ref = bindings[0]["roleRef"]
    assert (ref["apiGroup"], ref["kind"]) == ("rbac.authorization.k8s.io", "Role")
    role = _one(objects, "Role", ref["name"], namespace=namespace)
    granted = [r for r in role["rules"] if "discovery.k8s.io" in r["apiGroups"]
               and "endpointslices" in r["resources"]]
    assert granted and {"get", "list", "watch"} <= set(granted[0]["verbs"])
    # and nothing beyond reading EndpointSlices
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in role["rules"])


def test_the_gateway_reads_the_fleet_file_and_listens_where_it_says(objects, kustomization, fleet):
    (generator,) = kustomization["configMapGenerator"]
    key, _, source = generator["files"][0].partition("=")
    assert source == "fleet.yaml" and (DEPLOY / source).is_file()
    gateway = _one(objects, "Deployment", "modelfleet-gateway")
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == generator["name"]]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    args = container["args"]
    assert args[0] == "gateway"
    assert args[args.index("-c") + 1] == f"{mount['mountPath']}/{key}"
    port = _container_port(container, "http")
    assert port["containerPort"] == fleet["gateway"]["port"]
    assert fleet["gateway"]["host"] == "0.0.0.0"  # reachable from outside the pod
    service = _one(objects, "Service", "modelfleet-gateway")
    assert _selects(service["spec"]["selector"], gateway["spec"]["template"]["metadata"]["labels"])
    assert _container_port(container, service["spec"]["ports"][0]["targetPort"]) == port
