"""deploy/: the systemd unit and the Kubernetes manifests, checked by the machines that would read them.

No cluster and no systemd run here, so each file is checked by what can run: Kubernetes' own OpenAPI schemas
(kubernetes-validate's bundled copy, strict: an unknown field fails), ``systemd-analyze``, ``Settings`` for
every ``NIMBUS_*`` value, ``render()`` and ``haproxy -c`` for the balancer. The schema cannot see whether a
selector matches its pods or a probe its port; the cross-reference tests below do.
"""

from __future__ import annotations

import configparser
import copy
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from nimbus.cluster.haproxy import render
from nimbus.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "nimbus.service"
ENV_FILE = DEPLOY / "systemd" / "nimbus.env"
DOCKERFILE = DEPLOY / "Dockerfile"
NIMBUS = Path(sys.executable).with_name("nimbus")  # the console script `pip install .` made in this venv

# The oldest Kubernetes minor still commonly run, and the newest one kubernetes-validate bundles.
K8S_VERSIONS = ("1.31.0", "1.37.0")
NAMESPACE = "nimbus"
GRACEFUL_S = 30  # how long a node lets in-flight calls finish once its drain is over
SAMPLE_POD_IP = "10.244.1.7"  # what the downward API would put in POD_IP
WORKLOAD_KINDS = ("Deployment", "DaemonSet")


def _documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((str(path.relative_to(K8S)), doc))
    return found


DOCUMENTS = _documents()


def _one(kind: str, name: str) -> dict:
    (doc,) = [doc for _, doc in DOCUMENTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return doc


def _workloads() -> dict[str, dict]:
    """Every Deployment and DaemonSet by name."""
    return {doc["metadata"]["name"]: doc for _, doc in DOCUMENTS if doc["kind"] in WORKLOAD_KINDS}


def _node_workloads() -> list[dict]:
    return [doc for doc in _workloads().values() if _container(doc)["name"] == "nimbus"]


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet would set it: secrets read, $(VAR) references expanded."""
    values: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom")
        if source is None:
            values[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), var["value"])
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP", var
            values[var["name"]] = SAMPLE_POD_IP
        else:
            ref = source["secretKeyRef"]
            values[var["name"]] = _one("Secret", ref["name"])["stringData"][ref["key"]]
    return values


def _env_file() -> dict[str, str]:
    values = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            # Plain values only: where systemd's quoting and escaping rules would apply, this reading could differ.
            assert sep and not re.search(r"""["'\\\s]""", value), f"not a plain KEY=value line: {line!r}"
            values[name] = value
    return values


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return dict(pair.split("=", 1) for line in text.splitlines() if line.startswith("ENV ") for pair in line.split()[1:])


def _settings(monkeypatch, env: dict[str, str]) -> Settings:
    """Settings as a node given exactly ``env`` would build them (no stray NIMBUS_* of the test run, no toml)."""
    for name in list(os.environ):
        if name.startswith("NIMBUS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NIMBUS_CONFIG", "/nonexistent/nimbus.toml")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def _port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


# --- schemas ------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """Any connection attempt fails the test: the schemas must come from the installed package alone."""

    def refuse(self, address):
        raise AssertionError(f"the validator tried to reach {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[f"{w}:{d['kind']}/{d['metadata']['name']}"
                                                            for w, d in DOCUMENTS])
def test_every_manifest_validates_against_the_kubernetes_schemas_in_strict_mode(offline, where, doc, version):
    # SchemaNotFoundError (an unknown kind or apiVersion) is an error here too, not a warning.
    assert kubernetes_validate.validate(doc, version, strict=True) == version.rpartition(".")[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_strict_validation_refuses_a_misspelt_field(offline, version):
    deployment = copy.deepcopy(_one("Deployment", "nimbus-node"))
    pod = deployment["spec"]["template"]["spec"]
    pod["terminationGracePeriod"] = pod.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(deployment, version, strict=True)


def test_the_manifests_are_the_expected_set():
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for _, doc in DOCUMENTS)
    assert kinds == sorted([
        ("Namespace", NAMESPACE), ("Secret", "nimbus-database"), ("Service", "nimbus-nodes"),
        ("ConfigMap", "nimbus-haproxy"), ("Deployment", "nimbus-haproxy"), ("Service", "nimbus"),
        ("Deployment", "nimbus-node"), ("PodDisruptionBudget", "nimbus-node"), ("DaemonSet", "nimbus-node-kvm"),
    ])
    for where, doc in DOCUMENTS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, where


# --- references the schemas cannot see -----------------------------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_selectors_volumes_ports_and_references_match_up():
    workloads = _workloads()
    labels = {name: doc["spec"]["template"]["metadata"]["labels"] for name, doc in workloads.items()}
    for name, workload in workloads.items():
        assert _selects(workload["spec"]["selector"]["matchLabels"], labels[name]), name
        pod = workload["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        assert {mount["name"] for mount in _container(workload).get("volumeMounts", [])} <= volumes.keys(), name
        _env(_container(workload))  # every secretKeyRef names a Secret and a key the manifests hold
        for volume in volumes.values():
            if "configMap" in volume:
                _one("ConfigMap", volume["configMap"]["name"])
    for service in [doc for _, doc in DOCUMENTS if doc["kind"] == "Service"]:
        chosen = [name for name in workloads if _selects(service["spec"]["selector"], labels[name])]
        assert chosen, f"Service {service['metadata']['name']} selects no pods"
        for name in chosen:
            for port in service["spec"]["ports"]:
                _port(_container(workloads[name]), port["targetPort"])
    # The headless Service HAProxy resolves holds the nodes of both variants and nothing else.
    nodes = _one("Service", "nimbus-nodes")
    assert nodes["spec"]["clusterIP"] == "None"
    assert sorted(name for name in workloads if _selects(nodes["spec"]["selector"], labels[name])) == [
        "nimbus-node", "nimbus-node-kvm"]
    pdb = _one("PodDisruptionBudget", "nimbus-node")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels["nimbus-node"])


# --- NIMBUS_* settings ----------------------------------------------------------------------------------------


def test_every_nimbus_variable_named_is_a_settings_field():
    named = set(_env_file()) | set(_dockerfile_env())
    for workload in _node_workloads():
        named |= {var["name"] for var in _container(workload)["env"]}
    nimbus = {name for name in named if name.startswith("NIMBUS_")}
    assert {"NIMBUS_DATABASE_URL", "NIMBUS_DRAIN_S", "NIMBUS_ADVERTISE_URL", "NIMBUS_SDK_CACHE"} <= nimbus
    unknown = sorted(name for name in nimbus if name.removeprefix("NIMBUS_").lower() not in Settings.model_fields)
    assert not unknown, f"not Settings fields: {unknown}"


@pytest.mark.parametrize("name", ["nimbus-node", "nimbus-node-kvm"])
def test_each_node_workloads_environment_makes_valid_settings(monkeypatch, name):
    workload = _workloads()[name]
    container = _container(workload)
    env = _dockerfile_env() | _env(container)  # the image's ENV, overridden by the pod's
    settings = _settings(monkeypatch, env)
    assert (settings.host, settings.auth) == ("0.0.0.0", "on")
    assert settings.advertise_url == f"http://{SAMPLE_POD_IP}:{settings.port}"
    assert settings.database_url.startswith("postgresql://")
    assert settings.driver == ("firecracker" if workload["kind"] == "DaemonSet" else "bwrap")
    assert _port(container, "http") == settings.port


def test_the_systemd_env_file_makes_valid_settings(monkeypatch):
    settings = _settings(monkeypatch, _env_file())
    assert (settings.host, settings.auth, settings.driver) == ("0.0.0.0", "on", "bwrap")
    assert settings.database_url.startswith("postgresql://")
    # The unit's StateDirectory and CacheDirectory are where the env file points home and the SDK cache.
    service = _unit()["Service"]
    assert settings.home == Path("/var/lib") / service["StateDirectory"]
    assert settings.sdk_cache.parent == Path("/var/cache") / service["CacheDirectory"]


def test_the_database_urls_are_obvious_examples():
    secret = _one("Secret", "nimbus-database")
    assert secret["type"] == "Opaque" and "data" not in secret
    for url in [*secret["stringData"].values(), _env_file()["NIMBUS_DATABASE_URL"]]:
        assert "REPLACE-ME" in url and ".invalid:" in url


# --- systemd --------------------------------------------------------------------------------------------------


def _analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return analyze


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists: check a copy whose ExecStart is this venv's real nimbus
    # (the unit's /opt/nimbus/bin/nimbus is where docs/deploy.md installs it) and whose EnvironmentFile is
    # the example. Unknown keys and bad values are only warnings to it, so any output fails the test.
    analyze = _analyze()
    assert NIMBUS.is_file()
    text = UNIT.read_text()
    assert "ExecStart=/opt/nimbus/bin/nimbus up\n" in text and "EnvironmentFile=/etc/nimbus/nimbus.env\n" in text
    text = text.replace("/opt/nimbus/bin/nimbus", str(NIMBUS)).replace("/etc/nimbus/nimbus.env", str(ENV_FILE))
    checked = tmp_path / UNIT.name
    checked.write_text(text)
    done = subprocess.run([analyze, "verify", "--man=no", str(checked)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_systemd_analyze_verify_reports_a_misspelt_key(tmp_path):
    analyze = _analyze()
    broken = tmp_path / UNIT.name
    broken.write_text(UNIT.read_text().replace("/opt/nimbus/bin/nimbus", str(NIMBUS))
                      .replace("Delegate=yes", "Delgate=yes"))
    done = subprocess.run([analyze, "verify", "--man=no", str(broken)], capture_output=True, text=True, timeout=120)
    assert "Unknown key" in done.stderr and "Delgate" in done.stderr


def test_the_unit_delegates_cgroups_and_stops_after_the_drain():
    service = _unit()["Service"]
    assert service["Delegate"] == "yes"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # the node alone gets SIGTERM; its machines serve what it waits for
    # systemd's own reading of the time span, in microseconds.
    done = subprocess.run([_analyze(), "timespan", service["TimeoutStopSec"]], capture_output=True, text=True,
                          check=True, timeout=60)
    stop_s = int(re.search(r"μs: (\d+)", done.stdout)[1]) / 1e6
    assert stop_s > float(_env_file()["NIMBUS_DRAIN_S"]) + GRACEFUL_S


# --- Kubernetes probes and stopping ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nimbus-node", "nimbus-node-kvm"])
def test_probes_and_grace_period_of_the_nodes(name):
    workload = _workloads()[name]
    pod = workload["spec"]["template"]["spec"]
    container = _container(workload)
    port = int(_env(container)["NIMBUS_PORT"])
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/health" and _port(container, ready["port"]) == port
    for probe in ("livenessProbe", "startupProbe"):
        # A draining node answers 503 and must not be restarted: alive means listening.
        assert set(container[probe]) & {"httpGet", "grpc"} == set(), probe
        assert _port(container, container[probe]["tcpSocket"]["port"]) == port
    assert pod["terminationGracePeriodSeconds"] > float(_env(container)["NIMBUS_DRAIN_S"]) + GRACEFUL_S
    assert container["securityContext"]["privileged"] is True
    # The pause container is PID 1: it reaps orphans, and nimbus stays alone in its cgroup.
    assert pod["shareProcessNamespace"] is True


def test_the_firecracker_variant_runs_on_kvm_hosts_only():
    daemonset = _one("DaemonSet", "nimbus-node-kvm")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nimbus/kvm": "true"}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(daemonset)["volumeMounts"]}
    assert volumes[mounts["/dev/kvm"]]["hostPath"] == {"path": "/dev/kvm", "type": "CharDevice"}
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0  # one home, one node
    env = _env(_container(daemonset))
    state = next(path for path, name in mounts.items() if name == "state")
    assert env["NIMBUS_HOME"].startswith(state + "/") and env["NIMBUS_CHROOT_BASE"].startswith(state + "/")


def test_the_images_are_this_versions():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _container(_one("Deployment", "nimbus-node"))["image"] == f"nimbus:{version}"
    assert _container(_one("DaemonSet", "nimbus-node-kvm"))["image"] == f"nimbus:{version}-firecracker"


def test_the_dockerfile_copies_what_exists_and_runs_nimbus_up():
    text = DOCKERFILE.read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), line
    assert 'CMD ["nimbus", "up"]' in text and "STOPSIGNAL SIGTERM" in text


# --- HAProxy --------------------------------------------------------------------------------------------------


def _haproxy_dns() -> str:
    service = _one("Service", "nimbus-nodes")
    (port,) = service["spec"]["ports"]
    return f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port['port']}"


def test_the_haproxy_configmap_is_what_render_writes():
    config = _one("ConfigMap", "nimbus-haproxy")["data"]["haproxy.cfg"]
    assert config == render(dns=_haproxy_dns()), (
        "deploy/kubernetes/30-haproxy.yaml is stale: put render(dns=...)'s output in its ConfigMap")
    haproxy = _one("Deployment", "nimbus-haproxy")
    container = _container(haproxy)
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/usr/local/etc/haproxy"  # where the official image's CMD reads haproxy.cfg
    bind_port = int(re.search(r"^\s*bind \S+:(\d+)$", config, re.M)[1])
    assert _port(container, "http") == bind_port
    assert _one("Service", "nimbus")["spec"]["ports"][0]["targetPort"] == "http"


def test_haproxy_accepts_the_configmap(tmp_path):
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        pytest.skip("haproxy is not installed (Debian package haproxy)")
    config = tmp_path / "haproxy.cfg"
    config.write_text(_one("ConfigMap", "nimbus-haproxy")["data"]["haproxy.cfg"])
    done = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
