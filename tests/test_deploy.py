"""deploy/: the Dockerfile, Dagster instance, docker-compose file and Helm values agree
with the code (module name, image, storage, launchers, concurrency tags, GPU placement),
and the instance file really works against a PostgreSQL server."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from cv_assets.defs.events import event_embedding_backfill_job
from cv_assets.defs.k8s import GPU_POOL_LABEL, GPU_STEP_K8S_CONFIG, K8S_CONFIG_TAG
from cv_assets.defs.projects import PROJECT_CHAIN
from cv_assets.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MODULE = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dagster"]["module_name"]


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def backfill_limit(limits: list[dict]) -> int:
    kind = event_embedding_backfill_job.tags["cv_assets/kind"]
    return next(l["limit"] for l in limits if l["key"] == "cv_assets/kind" and l["value"] == kind)


def test_module_name_is_the_code_location_everywhere():
    assert MODULE == "cv_assets.definitions"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f'"-m", "{MODULE}"]' in dockerfile
    compose = load("docker-compose.yaml")
    assert compose["services"]["user_code"]["command"][-2:] == ["-m", MODULE]
    deployment = load("helm/values.yaml")["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", MODULE]


def test_dockerfile_variants_take_torch_from_pytorchs_index():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile and re.search(r"download\.pytorch\.org/whl/cu\d+", dockerfile)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"postgres", "deploy"} <= set(extras) and 'pip install ".[postgres,deploy]"' in dockerfile
    assert any(d.startswith("dagster-postgres") for d in extras["deploy"])
    assert "COPY deploy/dagster.yaml ${DAGSTER_HOME}/dagster.yaml" in dockerfile


def test_compose_services_image_workspace_and_storage_agree():
    compose = load("docker-compose.yaml")
    services = compose["services"]
    assert {"postgres", "user_code", "webserver", "daemon"} <= set(services)
    images = {services[name]["image"] for name in ("user_code", "webserver", "daemon")}
    assert images == {services["user_code"]["environment"]["DAGSTER_CURRENT_IMAGE"]}  # runs use the same image
    assert "pgvector" in services["postgres"]["image"]
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())["load_from"][0]["grpc_server"]
    assert workspace["host"] == "user_code" and str(workspace["port"]) in services["user_code"]["command"]
    env = {k: str(v) for k, v in services["user_code"]["environment"].items()}
    storage = load_settings(ROOT / "config.yaml", env=env).storage  # the code accepts what compose sets
    assert storage.database_url.startswith("postgresql+psycopg://") and "@postgres:" in storage.database_url
    assert storage.warehouse == "ducklake" and storage.ducklake_catalog_url.startswith("postgresql://")
    instance_env = services["webserver"]["environment"]
    assert instance_env["DAGSTER_POSTGRES_HOST"] == "postgres"


def test_instance_uses_postgres_queue_docker_launcher_and_backfill_limit():
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(DEPLOY))  # validates against Dagster's schema
    assert "postgres_db" in config["storage"]["postgres"]
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    compose = load("docker-compose.yaml")
    assert launcher["config"]["network"] in compose["networks"]
    assert compose["volumes"]["cv_assets_data"]["name"] == launcher["config"]["container_kwargs"]["volumes"][0].split(":")[0]
    forwarded = set(launcher["config"]["env_vars"])
    assert set(compose["services"]["user_code"]["environment"]) - {"DAGSTER_CURRENT_IMAGE"} <= forwarded
    workers = int(compose["services"]["user_code"]["environment"]["CV_ASSETS__EVENTS__BACKFILL_WORKERS"])
    assert backfill_limit(config["concurrency"]["runs"]["tag_concurrency_limits"]) >= workers > 1
    assert config["concurrency"]["pools"]["default_limit"] >= 1


def test_helm_values_launch_on_k8s_with_postgres_and_a_gpu_pool():
    values = load("helm/values.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is True
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    user_code = values["dagster-user-deployments"]
    assert user_code["enabled"] and user_code["deployments"][0]["includeConfigInLaunchedRuns"]["enabled"]
    env = {e["name"]: e["value"] for e in user_code["deployments"][0]["env"]}
    assert backfill_limit(values["concurrency"]["runs"]["tagConcurrencyLimits"]) >= int(env["CV_ASSETS__EVENTS__BACKFILL_WORKERS"])
    cpu_pool = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podSpecConfig"]["nodeSelector"]
    gpu = json.loads(event_embedding_backfill_job.tags[K8S_CONFIG_TAG])
    assert cpu_pool == {GPU_POOL_LABEL: "cpu"}
    assert gpu["pod_spec_config"]["node_selector"] == {GPU_POOL_LABEL: "gpu"}
    assert gpu["container_config"]["resources"]["requests"]["nvidia.com/gpu"] == "1"


GPU_ASSETS = {"reference_embeddings", "frame_embeddings", "asset_appearances"}  # their work is embedding


def k8s_config_of(tags) -> dict | None:
    """The `dagster-k8s/config` of an op's or a job's tags, as dagster-k8s reads it: a JSON
    string (Dagster encodes a dict given as an op tag)."""
    value = tags.get(K8S_CONFIG_TAG)
    return None if value is None else json.loads(value)


def test_embedding_steps_ask_for_a_gpu_node_and_every_other_step_does_not(settings_factory):
    from cv_assets.definitions import build_definitions

    settings, _ = settings_factory()
    defs = build_definitions(settings)
    job = defs.resolve_job_def("project_reprocess_job")
    assert GPU_ASSETS < set(PROJECT_CHAIN)
    for key in PROJECT_CHAIN:
        op = defs.resolve_assets_def(key).op
        step = job.graph.node_named(op.name)  # the node the executor turns into a step
        for tags in (op.tags, step.tags):
            config = k8s_config_of(tags)
            if key in GPU_ASSETS:
                assert config == GPU_STEP_K8S_CONFIG, key
                assert config["container_config"]["resources"]["requests"]["nvidia.com/gpu"] == "1"
                assert config["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
            else:  # manifest, video assets (one multi-asset op), continuity, report: CPU nodes
                assert config is None, key
    assert k8s_config_of(defs.resolve_assets_def("recurring_visitors").op.tags) is None


def test_the_k8s_executor_runs_each_step_as_its_own_job_with_its_tags(settings_factory):
    """runs.executor k8s: the project job uses dagster-k8s's k8s_job_executor, so each step
    is a Kubernetes Job and the embedding steps' GPU tags place them."""
    from dagster_k8s import k8s_job_executor

    from cv_assets.definitions import build_definitions

    settings, _ = settings_factory(runs={"executor": "k8s"})
    job = build_definitions(settings).resolve_job_def("project_reprocess_job")
    assert job.executor_def is k8s_job_executor
    assert k8s_config_of(job.graph.node_named("frame_embeddings").tags) == GPU_STEP_K8S_CONFIG


def test_the_gpu_tag_is_what_dagster_k8s_expects():
    config = k8s_config_of(event_embedding_backfill_job.tags)
    assert set(config) == {"container_config", "pod_spec_config"}
    resources = config["container_config"]["resources"]
    assert set(resources) == {"requests", "limits"} and resources["requests"]["nvidia.com/gpu"] == "1"
    assert all(isinstance(v, str) for part in resources.values() for v in part.values())  # k8s quantities
    pod = config["pod_spec_config"]
    assert pod["node_selector"] == {GPU_POOL_LABEL: "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config

    parsed = get_user_defined_k8s_config({K8S_CONFIG_TAG: json.dumps(GPU_STEP_K8S_CONFIG)})
    assert isinstance(parsed, UserDefinedDagsterK8sConfig)
    assert parsed.container_config["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert parsed.pod_spec_config["node_selector"] == {GPU_POOL_LABEL: "gpu"}


def test_the_instance_file_runs_on_a_real_postgresql(pg_server, tmp_path):
    """Dagster's own storage (runs, event log, schedules) migrates and works on PostgreSQL."""
    pytest.importorskip("dagster_postgres")
    from urllib.parse import parse_qs, urlparse

    from dagster import DagsterInstance, asset, materialize

    pg_server.psql("CREATE DATABASE dagster_instance_test;")
    socket_dir = parse_qs(urlparse(pg_server.get_uri()).query)["host"][0]
    config = load("dagster.yaml")
    config.pop("run_launcher")  # dagster-docker is an image dependency, not a test one
    # pgserver listens on a Unix socket, which postgres_db's hostname cannot name: the same
    # storage through postgres_url.
    config["storage"]["postgres"] = {"postgres_url": f"{config['storage']['postgres']['postgres_db']['scheme']}://postgres@/dagster_instance_test?host={socket_dir}"}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))

    @asset
    def probe() -> int:
        return 1

    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert materialize([probe], instance=instance).success
        assert instance.get_latest_materialization_event(probe.key) is not None
