"""The production deployment material in infra/, checked offline with the `k8s` extra installed: the instance config
against Dagster's own schemas and classes, the run pods' environment against what the code reads, the Helm values
against the instance and the asset graph, the Dockerfiles against pyproject.toml."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tomllib
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes import class_from_code_pointer
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config
from dagster_postgres import DagsterPostgresStorage

from laion_assets.core.clip.registry import LAION_EMBED, LAION_EN, LAION_MULTI
from laion_assets.core.paths import Layout
from laion_assets.core.settings import ModelSettings, OperationsSettings
from laion_assets.definitions import build_assets, resources_from_env
from laion_assets.resources import ENV_VARS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
INSTANCE = INFRA / "dagster.yaml"
VALUES = INFRA / "helm" / "values.yaml"
DOCKERFILES = {"cpu": INFRA / "Dockerfile", "cuda": INFRA / "Dockerfile.cuda"}

# Only through the Secret (envFrom): in env_vars their values would be written into every Job manifest.
SECRET_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
S3_SECRET = "laion-assets-s3"
# Dagster's own variables, which the Helm values may set for Dagster's processes (not for the code).
DAGSTER_VARS = {"DAGSTER_HOME", "DAGSTER_PG_PASSWORD"}
# Chart-rendered instance settings: Postgres and the compute log bucket are wired by the chart there.
INSTANCE_ONLY_VARS = {"DAGSTER_PG_HOST", "DAGSTER_PG_USERNAME", "DAGSTER_PG_DB", "DAGSTER_COMPUTE_LOGS_BUCKET"}
KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: offline, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: offline, user: {token: unused}}]
contexts: [{name: offline, context: {cluster: offline, user: offline}}]
current-context: offline
"""


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def env_refs(node: Any) -> set[str]:
    """The variables a Dagster config references as `{env: NAME}`."""
    if isinstance(node, dict) and set(node) == {"env"} and isinstance(node["env"], str):
        return {node["env"]}
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return set().union(*(env_refs(child) for child in children))


@pytest.fixture(scope="module")
def instance() -> dict:
    return load(INSTANCE)


@pytest.fixture(scope="module")
def values() -> dict:
    return load(VALUES)


@pytest.fixture
def instance_env(instance: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What the daemon's environment holds in production: every variable the instance or the launcher names."""
    names = env_refs(instance) | set(instance["run_launcher"]["config"]["env_vars"])
    env = {name: f"value-of-{name.lower()}" for name in names}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def launcher(instance: dict, instance_env: dict, tmp_path: Path) -> K8sRunLauncher:
    """The production launcher, built by dagster-k8s from the file; only the cluster it talks to is a stand-in."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    config = {**instance["run_launcher"]["config"], "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    processed = process_config(K8sRunLauncher.config_type(), config)
    assert processed.success, processed.errors
    return K8sRunLauncher(**processed.value)


def deployment(values: dict) -> dict:
    (only,) = values["dagster-user-deployments"]["deployments"]
    return only


def deployment_env(values: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in deployment(values)["env"]}


def image_name(image: dict) -> str:
    return f"{image['repository']}:{image['tag']}"


def set_pool_limits(values: dict) -> dict:
    (init,) = [c for c in values["dagsterDaemon"]["extraPrependedInitContainers"] if c["name"] == "set-pool-limits"]
    return init


def asset_pools() -> set[str]:
    return {a.op.pool for a in build_assets(Layout()) if isinstance(a, dg.AssetsDefinition) and a.op.pool}


# --- the instance -------------------------------------------------------------------------------------------------

def test_instance_validates_against_dagster_with_the_k8s_extra(instance: dict, instance_env: dict,
                                                               tmp_path: Path) -> None:
    shutil.copy(INSTANCE, tmp_path / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    # The instance schema leaves each pluggable class's config open: each class validates its own (and resolves
    # its {env: ...} references), as the instance does when it loads them.
    for section in ("run_launcher", "run_coordinator", "compute_logs", "scheduler"):
        klass = class_from_code_pointer(config[section]["module"], config[section]["class"])
        processed = process_config(klass.config_type(), config[section].get("config") or {})
        assert processed.success, (section, processed.errors)
    processed = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert processed.success, processed.errors
    assert processed.value["postgres_db"]["hostname"] == instance_env["DAGSTER_PG_HOST"]


def test_instance_runs_queued_k8s_runs_with_retries_monitoring_and_pools(instance: dict) -> None:
    assert (instance["run_launcher"]["module"], instance["run_launcher"]["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert list(instance["storage"]) == ["postgres"]
    runs = instance["concurrency"]["runs"]
    assert runs["max_concurrent_runs"] > 0
    assert all(limit["limit"] < runs["max_concurrent_runs"] for limit in runs["tag_concurrency_limits"])
    pools = instance["concurrency"]["pools"]
    # Per step: a bucket's run holds its download step for hours before the GPU steps.
    assert pools["granularity"] == "op" and pools["default_limit"] >= 1
    assert instance["run_retries"]["enabled"] and instance["run_retries"]["max_retries"] >= 1
    assert instance["run_retries"]["retry_on_asset_or_op_failure"] is True
    assert instance["run_monitoring"]["enabled"] and instance["run_monitoring"]["max_resume_run_attempts"] == 0
    assert instance["python_logs"]["python_log_level"] == "INFO"


def test_run_pods_get_every_variable_the_code_reads(instance: dict, launcher: K8sRunLauncher,
                                                    instance_env: dict) -> None:
    env_vars = set(instance["run_launcher"]["config"]["env_vars"])
    assert SECRET_VARS <= set(ENV_VARS)
    missing = set(ENV_VARS) - SECRET_VARS - env_vars
    assert not missing, f"add to env_vars in infra/dagster.yaml (and to the Helm env and envVars): {sorted(missing)}"
    assert not env_vars & SECRET_VARS
    assert S3_SECRET in instance["run_launcher"]["config"]["env_secrets"]
    # Run pods load this instance too: whatever it references must reach them.
    delivered = env_vars | {"DAGSTER_PG_PASSWORD"}  # the password through postgres_password_secret
    assert env_refs(instance) <= delivered
    # The run worker's Job as the launcher builds it (no code-location context, no tags).
    context = K8sContainerContext.create_for_run(DagsterRun(job_name="j", run_id="r"), launcher, include_run_tags=True)
    job = construct_dagster_k8s_job(context.get_k8s_job_config(job_image="image:tag", run_launcher=launcher),
                                    ["dagster", "api", "execute_run"], "dagster-run-r", context.run_k8s_config,
                                    pod_name="dagster-run-r", component="run_worker")
    container = job.spec.template.spec.containers[0]
    env = {e.name: e.value for e in container.env if e.value is not None}
    assert {name: env.get(name) for name in env_vars} == {name: instance_env[name] for name in env_vars}
    assert S3_SECRET in {source.secret_ref.name for source in container.env_from if source.secret_ref}
    assert not SECRET_VARS & set(env)
    assert container.image_pull_policy == "IfNotPresent"
    assert job.spec.template.spec.service_account_name == "dagster"


# --- the Helm values ------------------------------------------------------------------------------------------------

def test_helm_values_set_the_deployment_image_and_env(values: dict) -> None:
    deploy = deployment(values)
    assert deploy["image"]["repository"] and str(deploy["image"]["tag"])
    assert deploy["codeServerArgs"] == ["-m", "laion_assets.definitions"] and deploy["port"] == 3030
    assert deploy["includeConfigInLaunchedRuns"]["enabled"] is True
    env = deployment_env(values)
    missing = set(ENV_VARS) - SECRET_VARS - set(env)
    assert not missing, f"add to the deployment's env in infra/helm/values.yaml: {sorted(missing)}"
    assert env["LAION_ASSETS_STORAGE"].startswith("s3://")
    assert env["LAION_ASSETS_SOURCE"] == "s3://commoncrawl"
    assert [env[f"LAION_ASSETS_{name}"] for name in ("CHUNKS", "BUCKETS", "MODELS")] == ["512", "256", "laion"]
    assert env["LAION_ASSETS_ALLOW_NETWORKS"] == ""  # no exemption from the download guard in production
    # boto3 breaks on an empty region or endpoint, and the launcher requires every listed variable to be set.
    assert all(value for name, value in env.items() if name != "LAION_ASSETS_ALLOW_NETWORKS")
    assert {"name": S3_SECRET} in deploy["envSecrets"]
    # The code accepts these values as it reads them when the code location loads.
    layout, ops = Layout.from_env(env), OperationsSettings.from_env(env)
    assert (layout.chunks, layout.buckets) == (512, 256) and ops.sensor_interval_s == 300
    assert ModelSettings.from_env(env).preset == "laion"
    resources = resources_from_env(env, layout)
    assert resources["storage"].root == env["LAION_ASSETS_STORAGE"]
    assert resources["crawl_source"].base == "s3://commoncrawl" and resources["image_fetch"].allow_networks == []


def test_every_variable_the_helm_values_set_is_one_the_code_reads(values: dict) -> None:
    def names(node: Any, key: str = "") -> set[str]:
        found: set[str] = set()
        if isinstance(node, dict):
            for k, v in node.items():
                found |= names(v, k)
        elif isinstance(node, list):
            if key == "env":
                found |= {item["name"] for item in node}
            elif key == "envVars":
                found |= {item.split("=", 1)[0] for item in node}
            for item in node:
                found |= names(item)
        return found

    unknown = names(values) - set(ENV_VARS) - DAGSTER_VARS
    assert not unknown, f"the Helm values set variables nothing reads: {sorted(unknown)}"
    assert not names(values) & SECRET_VARS, "S3 credentials belong in the laion-assets-s3 Secret, not in values"
    # The daemon copies them into run pods, so it has exactly the deployment's env (one YAML anchor).
    assert values["dagsterDaemon"]["env"] == deployment(values)["env"]


@pytest.fixture
def chart(values: dict, instance: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The chart's wiring of a run: the launcher from the Helm values (its envVars read from the daemon's env) and
    the container context the chart gives the code location (`includeConfigInLaunchedRuns`), as dagster-k8s merges
    them; yields a function from a step's op tags (None: the run worker) to the pod's Job."""
    for name, value in {**deployment_env(values), **{n: "x" for n in env_refs(instance)}}.items():
        monkeypatch.setenv(name, value)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    helm = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher = K8sRunLauncher(
        service_account_name=values["global"]["serviceAccountName"], instance_config_map="dagster-instance",
        job_namespace="dagster", load_incluster_config=False, kubeconfig_file=str(kubeconfig),
        dagster_home="/opt/dagster/dagster_home", image_pull_policy=helm["imagePullPolicy"],
        env_vars=helm["envVars"], env_secrets=[s["name"] for s in helm["envSecrets"]],
        run_k8s_config={"job_spec_config": helm["runK8sConfig"]["jobSpecConfig"]})
    deploy = deployment(values)
    # What the chart's `dagsterUserDeployments.k8sContainerContext` helper renders for this deployment.
    code_location = K8sContainerContext.create_from_config({"k8s": {
        "image_pull_policy": deploy["image"]["pullPolicy"], "env_config_maps": [f"dagster-{deploy['name']}-user-env"],
        "env_secrets": [s["name"] for s in deploy["envSecrets"]], "resources": deploy["resources"],
        "namespace": "dagster", "service_account_name": values["global"]["serviceAccountName"],
        "env": deploy["env"]}})

    def pod_job(op_tags: dict[str, str] | None = None) -> Any:
        # The k8s executor's order for a step (K8sStepHandler): run context, code location, then the op's tags.
        run = DagsterRun(job_name="j", run_id="r")
        context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=op_tags is None)
        context = context.merge(code_location)
        if op_tags is not None:
            context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(op_tags)))
        config = context.get_k8s_job_config(job_image=image_name(deploy["image"]), run_launcher=launcher)
        args = ["dagster", "api", "execute_run" if op_tags is None else "execute_step"]
        return construct_dagster_k8s_job(config, args, "dagster-r", context.run_k8s_config, pod_name="dagster-r",
                                         component="run_worker" if op_tags is None else "step_worker")

    return pod_job


def test_helm_runs_get_the_deployment_env(values: dict, instance: dict, chart: Any) -> None:
    container = chart().spec.template.spec.containers[0]
    pod_env = {e.name: e.value for e in container.env}
    env, code_vars = deployment_env(values), set(ENV_VARS) - SECRET_VARS
    assert {name: pod_env.get(name) for name in code_vars} == {name: env[name] for name in code_vars}
    assert S3_SECRET in {source.secret_ref.name for source in container.env_from if source.secret_ref}
    # The deployment's resources win over the launcher's in dagster-k8s: the same run pod size on both paths.
    deploy = deployment(values)
    assert (container.resources.requests, container.resources.limits) == (
        deploy["resources"]["requests"], deploy["resources"]["limits"])
    run_container = instance["run_launcher"]["config"]["run_k8s_config"]["container_config"]
    assert run_container["resources"] == deploy["resources"]


def test_helm_instance_agrees_with_dagster_yaml(values: dict, instance: dict) -> None:
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert set(launcher["envVars"]) == set(instance["run_launcher"]["config"]["env_vars"]) - INSTANCE_ONLY_VARS
    assert launcher["envVars"] and set(launcher["envVars"]) <= set(deployment_env(values))
    assert [s["name"] for s in launcher["envSecrets"]] == instance["run_launcher"]["config"]["env_secrets"]
    assert launcher["imagePullPolicy"] == instance["run_launcher"]["config"]["image_pull_policy"]
    daemon = values["dagsterDaemon"]
    assert daemon["runCoordinator"]["enabled"] and daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    retries, monitoring = instance["run_retries"], instance["run_monitoring"]
    assert (daemon["runRetries"]["enabled"], daemon["runRetries"]["maxRetries"],
            daemon["runRetries"]["retryOnAssetOrOpFailure"]) == (
        retries["enabled"], retries["max_retries"], retries["retry_on_asset_or_op_failure"])
    assert (daemon["runMonitoring"]["enabled"], daemon["runMonitoring"]["startTimeoutSeconds"],
            daemon["runMonitoring"]["pollIntervalSeconds"], daemon["runMonitoring"]["maxResumeRunAttempts"]) == (
        monitoring["enabled"], monitoring["start_timeout_seconds"], monitoring["poll_interval_seconds"],
        monitoring["max_resume_run_attempts"])
    concurrency = values["concurrency"]
    assert concurrency["enabled"]
    assert concurrency["runs"]["maxConcurrentRuns"] == instance["concurrency"]["runs"]["max_concurrent_runs"]
    assert concurrency["runs"]["tagConcurrencyLimits"] == instance["concurrency"]["runs"]["tag_concurrency_limits"]
    assert (concurrency["pools"]["defaultLimit"], concurrency["pools"]["granularity"]) == (
        instance["concurrency"]["pools"]["default_limit"], instance["concurrency"]["pools"]["granularity"])
    assert values["pythonLogs"]["pythonLogLevel"] == instance["python_logs"]["python_log_level"]
    assert values["global"]["serviceAccountName"] == instance["run_launcher"]["config"]["service_account_name"]


def test_helm_values_set_a_limit_for_every_pool_the_assets_use(values: dict) -> None:
    init = set_pool_limits(values)
    script = " ".join(init["command"] + init["args"])
    limits = {pool: int(n) for pool, n in re.findall(r"dagster instance concurrency set (\S+) (\d+)", script)}
    pools = asset_pools()
    assert {"download", "gpu"} <= pools
    assert pools <= set(limits) and all(n >= 1 for n in limits.values()), (pools, limits)
    # It loads the chart's instance with our image, where the instance's classes are installed.
    assert init["image"] == image_name(deployment(values)["image"])
    env = {e["name"]: e for e in init["env"]}
    dagster_home = env["DAGSTER_HOME"]["value"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {f"{dagster_home}/dagster.yaml"}
    assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": values["global"]["postgresqlSecretName"], "key": "postgresql-password"}
    assert dagster_home == dockerfile_env(parse_dockerfile(DOCKERFILES["cpu"]))["DAGSTER_HOME"]


# --- GPU steps --------------------------------------------------------------------------------------------------------

def documented_gpu_tag() -> dict:
    (block,) = re.findall(r"```json\n(.*?)```", (INFRA / "README.md").read_text(), re.S)
    return json.loads(block)


def gpu_tag_json() -> str:
    return json.dumps(documented_gpu_tag())


def test_documented_gpu_tag_schedules_a_cuda_pod_on_a_gpu_node(values: dict, chart: Any) -> None:
    pod = chart({"dagster-k8s/config": gpu_tag_json()}).spec.template.spec
    container = pod.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    # The tag's size replaces the code server's, which every step inherits.
    assert container.resources.limits["memory"] == documented_gpu_tag()["container_config"]["resources"]["limits"][
        "memory"]
    assert container.image == image_name(deployment(values)["image"]) + "-cuda"
    assert pod.node_selector and any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in pod.tolerations)
    shm = {m.name for m in container.volume_mounts if m.mount_path == "/dev/shm"}
    assert any(v.name in shm and v.empty_dir and v.empty_dir.medium == "Memory" for v in pod.volumes)
    assert S3_SECRET in {source.secret_ref.name for source in container.env_from if source.secret_ref}


def test_gpu_pool_assets_request_a_gpu(chart: Any) -> None:
    gpu_assets = [a for a in build_assets(Layout()) if isinstance(a, dg.AssetsDefinition) and a.op.pool == "gpu"]
    assert gpu_assets
    for asset in gpu_assets:
        container = chart(asset.op.tags).spec.template.spec.containers[0]
        assert (container.resources.limits or {}).get("nvidia.com/gpu") == "1", asset.key


def test_release_and_index_steps_get_a_memory_limit_of_their_own(chart: Any) -> None:
    """The release stage and the indices do not inherit the code server's size: each step's pod asks for what its
    bounded-memory design needs, with a limit equal to the request."""
    heavy = {"image_dedup", "semantic_dedup", "filtered_metadata", "release", "knn_index", "knn_index_all"}
    assets = {key.path[-1]: a for a in build_assets(Layout()) if isinstance(a, dg.AssetsDefinition)
              for key in a.keys if key.path[-1] in heavy}
    assert set(assets) == heavy
    for name, asset in assets.items():
        resources = chart(asset.op.tags).spec.template.spec.containers[0].resources
        assert resources.limits["memory"] == resources.requests["memory"], name
        assert resources.requests.get("cpu"), name


# --- the images -------------------------------------------------------------------------------------------------------

def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuations joined, heredoc bodies kept with their RUN."""
    instructions: list[tuple[str, str]] = []
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        for delimiter in re.findall(r"<<-?'?(\w+)'?", line):
            body = []
            for inner in lines:
                if inner.strip() == delimiter:
                    break
                body.append(inner)
            line += "\n" + "\n".join(body)
        keyword, _, rest = line.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(shlex.split(rest)[0].split("=", 1)
                for keyword, rest in instructions if keyword == "ARG" and "=" in rest)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_the_k8s_extra_and_serves_the_code_location(kind: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[kind])
    keywords = [keyword for keyword, _ in instructions]
    text = "\n".join(rest for _, rest in instructions)
    args = dockerfile_args(instructions)
    pins = dict(re.match(r"([\w-]+)==(\S+)", dep).groups() for dep in tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if re.match(r"torch(vision)?==", dep))
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (pins["torch"], pins["torchvision"])
    base = args["PYTHON_IMAGE"] if kind == "cpu" else args["CUDA_IMAGE"]
    if kind == "cpu":
        assert base.startswith("python:3.11-slim") and args["TORCH_INDEX"].endswith("/whl/cpu")
    else:
        assert re.match(r"nvidia/cuda:12\.\d+(\.\d+)?-", base) and args["PYTHON_VERSION"] == "3.11"
        assert re.search(r"/whl/cu12\d$", args["TORCH_INDEX"])
    # The k8s extra: its requirements in the dependency layer, and the project installed with it.
    assert '["optional-dependencies"]["k8s"]' in text and re.search(r'pip install [^\n]*/tmp/build\[k8s\]', text)
    # Dependencies before the code, so that a code change reuses the dependency layers.
    copies = [rest for keyword, rest in instructions if keyword == "COPY"]
    sources = [c.split()[0] for c in copies if not c.startswith("--from")]
    assert sources == ["pyproject.toml", "README.md", "laion_assets"]
    # The chart and the launcher set only args ("dagster api ..."): an ENTRYPOINT would swallow them.
    assert "ENTRYPOINT" not in keywords
    user = [rest for keyword, rest in instructions if keyword == "USER"]
    assert user and user[-1] not in ("0", "root")
    assert ("EXPOSE", "3030") in instructions
    assert json.loads([rest for keyword, rest in instructions if keyword == "CMD"][-1]) == [
        "dagster", "code-server", "start", "-m", "laion_assets.definitions", "-h", "0.0.0.0", "-p", "3030"]


def test_both_images_run_a_code_origin_the_same_way() -> None:
    cpu, cuda = (parse_dockerfile(DOCKERFILES[k]) for k in ("cpu", "cuda"))
    for name in ("VIRTUAL_ENV", "PATH", "DAGSTER_HOME"):
        assert dockerfile_env(cpu)[name] == dockerfile_env(cuda)[name]
    assert [r for k, r in cpu if k in ("WORKDIR", "USER")] == [r for k, r in cuda if k in ("WORKDIR", "USER")]
    preload = dockerfile_args(cuda)["LAION_CLIPS"].split()
    assert preload == [f"{spec.arch}:{spec.pretrained}" for spec in (LAION_EN, LAION_MULTI, LAION_EMBED)]
