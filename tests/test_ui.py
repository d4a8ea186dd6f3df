"""The UI as a user meets it: a real `dagster-webserver` and daemon on a free local port,
driven through the webserver's GraphQL API (what the browser calls).

One session-scoped fixture writes the small demo, runs `make run`'s code
(`run_everything`) into a temp DAGSTER_HOME with the project's dagster.yaml, starts the
report server `make ui` starts, then the webserver and the daemon. The daemon starts
after `make run` finished, so the project sensor's first tick sees the demo processed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from cv_assets.cli.serve_reports import start_report_server
from cv_assets.demo import write_demo_data

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOCATION = "cv_assets"
REPOSITORY = "__repository__"
STARTUP_TIMEOUT = 240
RUN_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UI:
    def __init__(self, url: str, root: Path, report_base: str, processes: list):
        self.url, self.root, self.report_base, self.processes = url, root, report_base, processes

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.load(response)
        assert not payload.get("errors"), payload["errors"]
        return payload["data"]

    def logs(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


def _wait(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _start(root: Path, name: str, args: list[str], env: dict) -> subprocess.Popen:
    log = open(root / f"{name}.log", "wb")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the webserver's code server goes too
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    write_demo_data(root / "data", scene_seconds=3, n_events=30)
    report_base = f"http://127.0.0.1:{_free_port()}"
    config = root / "config.yaml"
    data = root / "data"
    config.write_text(
        "storage:\n"
        f"  database_url: sqlite:///{data}/cv_assets.sqlite\n"
        f"  duckdb_path: {data}/warehouse.duckdb\n"
        f"  frames_dir: {data}/frames\n"
        f"  reports_dir: {data}/reports\n"
        f"  reports_base_url: {report_base}\n"
        f"  projects_root: {data}/projects\n"
        f"  thumbnails_root: {data}/thumbnails\n"
        "embedder:\n"
        f"  model: {root}/no-clip-weights-here\n"
        "  fallback: color_histogram\n"
    )
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")  # as `make run` / `make ui` do
    env = {**os.environ, "DAGSTER_HOME": str(home), "CV_ASSETS_CONFIG": str(config), "DAGSTER_DISABLE_TELEMETRY": "1"}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    workspace = ["-w", str(REPO / "workspace.yaml")]
    processes = []
    report_server = None
    saved = {key: os.environ.get(key) for key in ("DAGSTER_HOME", "CV_ASSETS_CONFIG")}
    try:
        os.environ.update(DAGSTER_HOME=str(home), CV_ASSETS_CONFIG=str(config))
        # Create the instance's SQLite storages once, here: two processes creating them at the
        # same moment can both stamp the schema version (Dagster's storage is not safe for that).
        from dagster import DagsterInstance

        with DagsterInstance.get() as instance:
            instance.get_runs(limit=1)
        # The webserver loads the code location while `make run`'s code runs here.
        processes.append(_start(root, "webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                                    *workspace], env))
        from cv_assets.cli.run_demo import run_everything

        summary = run_everything(str(config))
        assert summary["projects"] and all(p["success"] for p in summary["projects"].values()), summary.get("text")
        report_server = start_report_server(data / "reports", report_base)
        # The daemon (sensors, schedules, the run queue) starts after `make run` finished.
        processes.append(_start(root, "daemon", [str(BIN / "dagster-daemon"), "run", *workspace], env))
        handle = UI(url, root, report_base, processes)

        def loaded():
            try:
                data_ = handle.graphql(WORKSPACE_QUERY)
            except (urllib.error.URLError, ConnectionError, OSError):
                return None
            entries = data_["workspaceOrError"]["locationEntries"]
            return entries if entries and all(e["loadStatus"] == "LOADED" for e in entries) else None

        _wait(loaded, STARTUP_TIMEOUT, "the webserver to load the code location")
        yield handle
    finally:
        for process in reversed(processes):
            _stop(process)
        if report_server is not None:
            report_server.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } ... on RepositoryLocation { name } } } } } }
"""

SENSOR_TICKS = """
query ($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) { __typename
  ... on Sensor { description sensorState { status ticks(limit: 20) { status timestamp skipReason runIds
    error { message } } } } } }
"""

LAUNCH = """
mutation ($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } ... on InvalidSubsetError { message }
  ... on RunConfigValidationInvalid { errors { message } } } }
"""

RUN = """
query ($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status tags { key value } } } }
"""

RUN_LOGS = """
query ($id: ID!) { logsForRun(runId: $id, limit: 5000) { __typename
  ... on EventConnection { events { __typename ... on MessageEvent { message level } } } } }
"""

REPORT_MATERIALIZATION = """
{ assetOrError(assetKey: {path: ["project_report"]}) { __typename ... on Asset {
  assetMaterializations(partitions: ["demo"], limit: 1) { runId metadataEntries { label __typename
    ... on MarkdownMetadataEntry { mdStr } ... on UrlMetadataEntry { url } ... on PathMetadataEntry { path } } } } } }
"""


def test_code_location_loads_without_errors(ui):
    entries = ui.graphql(WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
    assert [e["name"] for e in entries] == [LOCATION]
    assert entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation", entries[0]
    assert "Traceback" not in ui.logs("webserver")


def test_sensor_first_tick_after_make_run_requests_no_run(ui):
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": "project_sensor"}

    def ticks():
        sensor = ui.graphql(SENSOR_TICKS, {"selector": selector})["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        done = [t for t in sensor["sensorState"]["ticks"] if t["status"] != "STARTED"]
        return sensor if done else None

    sensor = _wait(ticks, 120, "the project sensor's first tick to finish", interval=2)
    assert "already processed" in sensor["description"]
    first = min(sensor["sensorState"]["ticks"], key=lambda t: t["timestamp"])
    assert first["error"] is None, first["error"]
    assert first["runIds"] == [] and first["status"] == "SKIPPED", first
    assert "1 project unchanged (demo)" in first["skipReason"]


def test_partition_launched_from_the_ui_succeeds_and_names_its_embedder(ui):
    params = {
        "selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": "project_reprocess_job"},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "demo"}]},
        "runConfigData": {},
    }
    launched = ui.graphql(LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    def finished():
        run = ui.graphql(RUN, {"id": run_id})["runOrError"]
        return run if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None

    run = _wait(finished, RUN_TIMEOUT, f"run {run_id} to finish", interval=2)
    events = ui.graphql(RUN_LOGS, {"id": run_id})["logsForRun"]["events"]
    failures = [e.get("message") for e in events if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent")]
    assert run["status"] == "SUCCESS", failures
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert tags["cv_assets/embedder"] == "color_histogram-v1"
    warnings = [e["message"] for e in events if e.get("level") == "WARNING" and "CLIP is unavailable" in (e.get("message") or "")]
    assert len(warnings) == 1, "the fallback is named once per run, in the run's own log"

    # make run embedded everything: this run's embedding metadata says so instead of zeros
    for asset_name in ("reference_embeddings", "frame_embeddings"):
        entries = _latest_metadata(ui, asset_name)
        assert entries["status"]["text"].startswith("unchanged since run "), entries["status"]
        assert "embedded" not in entries and "images_per_sec" not in entries
        assert entries["embedder"]["text"].startswith("colour-histogram fallback, not CLIP")
        assert "step_seconds" in entries

    # every check result of the run explains itself in one line
    for asset_name, check in PROJECT_CHECKS:
        executions = ui.graphql(CHECK_EXECUTIONS, {"key": {"path": [asset_name]}, "check": check})["assetCheckExecutions"]
        mine = [e for e in executions if e["runId"] == run_id]
        assert mine and mine[0]["evaluation"]["description"], (check, executions[:1])
        assert "\n" not in mine[0]["evaluation"]["description"].strip()


PROJECT_CHECKS = [("video_clips", "video_clips_all_decodable"), ("reference_embeddings", "reference_embeddings_are_valid"),
                  ("frame_embeddings", "frame_embeddings_are_valid"), ("asset_appearances", "appearances_are_well_formed")]

CHECK_EXECUTIONS = """
query ($key: AssetKeyInput!, $check: String!) { assetCheckExecutions(assetKey: $key, checkName: $check, limit: 5) {
  runId evaluation { description severity } } }
"""

LATEST_METADATA = """
query ($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
  assetMaterializations(partitions: ["demo"], limit: 1) { runId metadataEntries { label __typename
    ... on TextMetadataEntry { text } ... on FloatMetadataEntry { floatValue } } } } } }
"""


def _latest_metadata(ui: UI, asset_name: str) -> dict:
    asset = ui.graphql(LATEST_METADATA, {"key": {"path": [asset_name]}})["assetOrError"]
    return {e["label"]: e for e in asset["assetMaterializations"][0]["metadataEntries"]}


def test_report_metadata_shows_pictures_and_links_the_served_report(ui):
    asset = ui.graphql(REPORT_MATERIALIZATION)["assetOrError"]
    entries = {e["label"]: e for e in asset["assetMaterializations"][0]["metadataEntries"]}
    pictures = [label for label in entries if label == "timeline" or label.endswith("_contact_sheet")]
    assert "timeline" in pictures and len(pictures) >= 5, sorted(entries)  # timeline + one sheet per demo scene
    for label in pictures:
        md = entries[label]["mdStr"]
        assert md.startswith("![") and "(data:image/jpeg;base64," in md
        encoded = md.split("base64,", 1)[1].split(")", 1)[0]
        image = cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[1] <= 720
        assert len(encoded) < 150_000, f"{label}: keep inline pictures small"
    url = entries["report"]["url"]
    assert url == f"{ui.report_base}/demo.html"
    assert entries["report_path"]["path"].endswith("demo.html")
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        assert "<h2>Timeline</h2>" in response.read().decode()
